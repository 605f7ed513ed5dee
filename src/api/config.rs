//! What `tenantry api` is configured with: routing and auth settings, the request limits, and
//! the one shared pool (opened by [`connect`], which refuses roles that bypass isolation).

use std::time::Duration;

use super::{
    auth::AuthConfig,
    pool::{Pool, PoolError},
};

/// Settings of `tenantry api`.
#[derive(Clone)]
pub struct Settings {
    pub auth: AuthConfig,
    pub limits: Limits,
    /// The server this API's pool connects to (`--server`): tenants placed on another one
    /// are answered 503 `tenant-on-another-server`, never served from this pool.
    pub server: String,
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
    /// How long a statement waits for a lock (`SET LOCAL lock_timeout`) before it is refused
    /// with 503 `lock-timeout`; 0 = no limit but the statement timeout. A tenant can lock
    /// its own tables from a direct session: without this, every API request of that tenant
    /// would hold a pool connection for the whole statement timeout.
    pub lock_timeout_ms: u64,
    /// Data requests one tenant may have in flight at once (each holds or waits for a pool
    /// connection); 0 = the default rule, a quarter of the pool (at least 1). See
    /// [`Limits::tenant_concurrency`].
    pub tenant_max_concurrency: u32,
}

impl Limits {
    /// These limits for one tenant: its own statement timeout (`spec.limits.statementTimeout`)
    /// when it has one. The request's deadline follows it (see `tx::run`).
    pub fn for_tenant(&self, statement_timeout_ms: Option<u64>) -> Self {
        Self {
            statement_timeout_ms: statement_timeout_ms.unwrap_or(self.statement_timeout_ms),
            ..*self
        }
    }

    /// Concurrent data requests allowed per tenant with a pool of `pool_size` connections:
    /// `tenant_max_concurrency`, or when 0 `max(1, pool_size / 4)`, so that no tenant can
    /// hold more than its share of the pool.
    pub fn tenant_concurrency(&self, pool_size: u32) -> usize {
        match self.tenant_max_concurrency {
            0 => (pool_size / 4).max(1) as usize,
            n => n as usize,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_limit: 100,
            max_limit: 1000,
            max_offset: 100_000,
            max_body_bytes: 1 << 20,
            statement_timeout_ms: 5000,
            lock_timeout_ms: 1000,
            tenant_max_concurrency: 0,
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
    /// Prepared statements kept per connection (least recently used ones are closed).
    pub statement_cache: usize,
    /// How long a request waits for a connection of its tenant's home group before taking
    /// any group's (see [`super::pool`]); zero takes any free connection at once.
    pub home_wait: Duration,
}

/// Why the shared pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Database(#[from] PoolError),
    #[error("could not read the login role: {0}")]
    LoginRole(String),
    #[error("refusing to serve as {user:?}: it is a superuser or bypasses row-level security, so PostgreSQL would not enforce tenant isolation; log in as the gateway role (default tenantry_gateway) or pass --allow-privileged-role")]
    PrivilegedRole { user: String },
}

/// Opens the shared pool and refuses roles that would make isolation depend on our code
/// alone (superusers, BYPASSRLS), unless `allow_privileged`.
pub async fn connect(
    url: &str,
    cfg: PoolConfig,
    allow_privileged: bool,
) -> Result<Pool, ConnectError> {
    let pool = Pool::open(url, cfg).await?;
    let (user, superuser, bypass) = pool
        .login_role()
        .await
        .map_err(|e| ConnectError::LoginRole(e.detail))?;
    if (superuser || bypass) && !allow_privileged {
        return Err(ConnectError::PrivilegedRole { user });
    }
    Ok(pool)
}
