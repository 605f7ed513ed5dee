//! `tenantry api`: the tenant-aware data API. Each request is resolved to a tenant from the
//! watch-fed [`Registry`](crate::registry::Registry), authenticated with a JWT, and served in
//! one transaction on one shared pool that first switches to the tenant's role and schema
//! (`set_config(…, true)`, local to the transaction), so PostgreSQL itself refuses anything outside the tenant's schema.
//!
//! Dependencies point one way: `api` → `registry`, `domain` and the PostgreSQL connection
//! options; never the controller.

pub mod auth;
pub mod config;
pub mod error;
mod handlers;
pub mod observe;
pub mod openapi;
pub mod pool;
pub mod query;
mod router;
mod servers;
mod share;
mod state;
pub mod tenant;
mod tx;
pub mod wire;

pub use config::{connect, ConnectError, Limits, PoolConfig, Settings};
pub use error::ApiError;
pub use handlers::ALL_ROWS_HEADER;
pub use observe::ApiMetrics;
pub use pool::Pool;
pub use router::{ops_router, router, serve, serve_ops};
pub use servers::ServerPools;
pub use state::AppState;
pub use tenant::TenantRequest;
