//! The Tenant operator: a kube-runtime `Controller` over Tenants (and the Secrets they own),
//! one pipeline per Tenant behind kube-runtime's finalizer helper, and its runtime. It builds on
//! `domain`, `postgres`, `telemetry`, `health` and `leader`; nothing else depends on it.
//!
//! - `error`: stages and the reconcile error, with metric labels.
//! - `context`: state shared by reconciles (watch caches, fast-path cache, failure counters)
//!   and Event publishing.
//! - `fleet`: the watched Tenants and the indexes kept from their watch (routing claims,
//!   rollout counters), so that a reconcile's questions about the fleet cost the same at any
//!   fleet size.
//! - `reconcile`: entry point, backoff, and the one report step that writes Events and status;
//!   `events`: every Event reason.
//! - `provision`, `cleanup`: the apply and delete pipelines; `credentials`: Secret I/O;
//!   `rollout`: canary and halt; `gateway`: the API's role; `runtime`: wiring.
//! - `usage`: the fleet's storage usage, measured periodically, kept for reconciles;
//!   `drift`: the fleet's schema drift, scanned periodically, kept for reconciles.

mod cleanup;
mod context;
mod credentials;
mod drift;
mod error;
pub mod events;
mod fleet;
mod gateway;
mod live;
mod provision;
mod reconcile;
mod rollout;
mod runtime;
mod servers;
mod usage;

pub use context::Context;
pub use error::{Error, Stage};
pub use gateway::{ensure_gateway, GatewayError};
pub use live::{MigrationSource, SourceKind};
pub use reconcile::{error_policy, reconcile, FIELD_MANAGER, RESYNC};
pub use rollout::RolloutPolicy;
pub use runtime::{run, RunError, Settings};
