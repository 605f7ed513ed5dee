//! The data path's connections: a bounded pool of tokio-postgres clients, each with its own
//! bounded cache of prepared statements. tokio-postgres pipelines requests issued
//! concurrently on one client, which is what lets a request's `BEGIN … SET LOCAL …`, its
//! statement and its `COMMIT` leave in one write (see [`super::tx`]). sqlx, which does not
//! pipeline, stays everywhere else.

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hashlink::LruCache;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_postgres::{Client, NoTls, Statement};

use super::{config::PoolConfig, error::ApiError};

/// Prepared statements kept per connection: one per (tenant table, query shape) the
/// connection has served. Evicting one drops the last [`Statement`] handle, which makes
/// tokio-postgres close (deallocate) it on the server.
pub const STATEMENT_CACHE: usize = 4096;

/// Why the pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid database URL: {0}")]
    Url(tokio_postgres::Error),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// One pool for all tenants. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    cfg: PoolConfig,
    /// One permit per connection that may exist: held by every lease and by every background
    /// replacement, so PostgreSQL never sees more than `cfg.size` of ours.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Conn>>,
}

/// One connection, its driver task and its statements.
pub(super) struct Conn {
    pub(super) client: Client,
    task: JoinHandle<()>,
    /// Recycle after this instant: the configured lifetime less up to a quarter, at random,
    /// so that connections opened together are not all replaced together.
    retire_at: Instant,
    statements: LruCache<String, Statement>,
}

impl Conn {
    pub(super) fn statement(&mut self, sql: &str) -> Option<Statement> {
        self.statements.get(sql).cloned()
    }

    pub(super) fn remember(&mut self, sql: &str, s: Statement) {
        self.statements.insert(sql.to_string(), s);
    }

    pub(super) fn forget(&mut self, sql: &str) {
        self.statements.remove(sql);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Ends the driver task, which closes the socket: the server ends the session and
        // rolls back whatever transaction it was in.
        self.task.abort();
    }
}

impl Pool {
    /// A pool for `url` (a `postgres://` URL or key=value string), opening one connection
    /// now so that a bad URL or password shows at start.
    pub async fn open(url: &str, cfg: PoolConfig) -> Result<Self, PoolError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(PoolError::Url)?;
        config
            .application_name("tenantry-api")
            .connect_timeout(cfg.acquire_timeout);
        let inner = Arc::new(Inner {
            config,
            cfg,
            permits: Arc::new(Semaphore::new(cfg.size.max(1) as usize)),
            idle: Mutex::new(Vec::new()),
        });
        let first = inner.connect().await?;
        inner.idle.lock().expect("pool lock").push(first);
        Ok(Self { inner })
    }

    /// A connection to run one transaction on. It returns to the pool only when the lease
    /// says it ended cleanly (see [`Lease::clean`]).
    pub(super) async fn get(&self) -> Result<Lease, ApiError> {
        let permit = tokio::time::timeout(
            self.inner.cfg.acquire_timeout,
            self.inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| pool_exhausted())?
        .map_err(|_| pool_exhausted())?;
        let reused = loop {
            let c = self.inner.idle.lock().expect("pool lock").pop();
            match c {
                Some(c) if c.client.is_closed() => continue,
                other => break other,
            }
        };
        let conn = match reused {
            Some(c) => c,
            None => self.inner.connect().await.map_err(ApiError::from)?,
        };
        Ok(Lease {
            conn: Some(conn),
            permit: Some(permit),
            pool: self.inner.clone(),
            clean: false,
        })
    }

    /// The login role and whether it is a superuser or bypasses row-level security.
    pub(super) async fn login_role(&self) -> Result<(String, bool, bool), tokio_postgres::Error> {
        let c = self.inner.idle.lock().expect("pool lock").pop();
        let c = match c {
            Some(c) => c,
            None => self.inner.connect().await?,
        };
        let row = c
            .client
            .query_one(
                "SELECT rolname::pg_catalog.text, rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?;
        self.inner.idle.lock().expect("pool lock").push(c);
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    /// Connections the pool may open at most.
    pub fn capacity(&self) -> u32 {
        self.inner.cfg.size.max(1)
    }

    /// Connections open now (idle or leased), as far as the permits tell.
    pub fn size(&self) -> usize {
        self.inner.cfg.size as usize - self.inner.permits.available_permits() + self.num_idle()
    }

    pub fn num_idle(&self) -> usize {
        self.inner.idle.lock().expect("pool lock").len()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.inner.cfg.size)
            .field("idle", &self.num_idle())
            .finish()
    }
}

fn pool_exhausted() -> ApiError {
    ApiError::unavailable(
        "pool-exhausted",
        "all database connections are busy; retry shortly",
        1,
    )
}

impl Inner {
    async fn connect(&self) -> Result<Conn, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let life = self.cfg.max_lifetime.as_secs_f64() * (1.0 - rand::random::<f64>() / 4.0);
        Ok(Conn {
            client,
            task,
            retire_at: Instant::now() + Duration::from_secs_f64(life),
            statements: LruCache::new(STATEMENT_CACHE),
        })
    }
}

/// A leased connection. Dropped with `clean` unset — the request failed mid-transaction or
/// was cancelled between `BEGIN` and the end of its transaction — the connection is closed,
/// never returned: it may be inside a transaction, with the tenant's role set, or with
/// statements still in flight.
pub(super) struct Lease {
    conn: Option<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Inner>,
    /// Set only once the transaction ended with a `COMMIT` or `ROLLBACK` the server answered.
    pub(super) clean: bool,
}

impl Lease {
    pub(super) fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("leased connection")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (Some(conn), Some(permit)) = (self.conn.take(), self.permit.take()) else {
            return;
        };
        if !self.clean || conn.client.is_closed() {
            return; // conn dropped: closed; the permit frees its slot
        }
        if Instant::now() < conn.retire_at {
            self.pool.idle.lock().expect("pool lock").push(conn);
            return;
        }
        // Recycle off the request path: the replacement connects under the retiring
        // connection's permit, so the pool never exceeds its size and no request waits.
        let pool = self.pool.clone();
        drop(conn);
        tokio::spawn(async move {
            if let Ok(c) = pool.connect().await {
                pool.idle.lock().expect("pool lock").push(c);
            }
            drop(permit);
        });
    }
}
