//! What `tenantry api` is configured with: routing and auth settings, the request limits, and
//! the one shared pool (opened by [`connect`], which refuses roles that bypass isolation).

use std::time::Duration;

use sqlx::{postgres::PgPoolOptions, PgPool};

use super::auth::AuthConfig;

/// Settings of `tenantry api`.
#[derive(Clone)]
pub struct Settings {
    pub auth: AuthConfig,
    pub limits: Limits,
}

/// Bounds on what one request may ask for and cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rows returned when no `limit` is given.
    pub default_limit: i64,
    pub max_limit: i64,
    pub max_offset: i64,
    pub max_body_bytes: usize,
    pub statement_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_limit: 100,
            max_limit: 1000,
            max_offset: 100_000,
            max_body_bytes: 1 << 20,
            statement_timeout_ms: 5000,
        }
    }
}

/// Pool settings: one pool for all tenants.
#[derive(Clone, Copy)]
pub struct PoolConfig {
    pub size: u32,
    pub acquire_timeout: Duration,
    /// Connections are recycled after this long, bounding each backend's catalog cache as it
    /// visits many tenant schemas.
    pub max_lifetime: Duration,
}

/// Why the shared pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("refusing to serve as {user:?}: it is a superuser or bypasses row-level security, so PostgreSQL would not enforce tenant isolation; log in as the gateway role (default tenantry_gateway) or pass --allow-privileged-role")]
    PrivilegedRole { user: String },
}

/// Opens the shared pool and refuses roles that would make isolation depend on our code
/// alone (superusers, BYPASSRLS), unless `allow_privileged`.
pub async fn connect(
    url: &str,
    cfg: PoolConfig,
    allow_privileged: bool,
) -> Result<PgPool, ConnectError> {
    let opts = crate::postgres::connect_options(url)?
        .application_name("tenantry-api")
        // One prepared statement per (tenant table, query shape) per connection: tenants
        // times shapes, not the default 100, or every request would re-prepare.
        .statement_cache_capacity(4096);
    let pool = PgPoolOptions::new()
        .max_connections(cfg.size)
        .min_connections(0)
        .acquire_timeout(cfg.acquire_timeout)
        .max_lifetime(cfg.max_lifetime)
        .connect_with(opts)
        .await?;
    let (user, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::pg_catalog.text, rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&pool)
    .await?;
    if (superuser || bypass) && !allow_privileged {
        return Err(ConnectError::PrivilegedRole { user });
    }
    Ok(pool)
}
