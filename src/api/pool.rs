//! The data path's connections: a bounded pool of [`WireConn`] sessions, each with its own
//! bounded cache of prepared statements, so that a request's settings, its statement (and
//! the statement's preparation, the first time) leave in one write ending in one `Sync`
//! (see [`super::tx`] and [`super::wire`]). sqlx, which does not pipeline, stays everywhere
//! else.
//!
//! The connections are split into groups of [`GROUP_SIZE`], and each tenant is served by
//! its home group (a hash of its schema) whenever one of that group's connections is free,
//! so a backend only ever prepares statements for, and caches the catalog of, about
//! `1 / groups` of the tenants: with 1,000 tenants and 16 connections, each backend sees
//! some 250 schemas instead of all 1,000. A request whose home group stays busy for longer
//! than the home wait (`--pool-home-wait-ms`, 20 ms by default: far above a request's usual
//! queueing, far below a slow statement) also takes whichever connection of another group
//! frees first, keeping its place in its home group's queue: tenants that hold their home
//! group with slow statements make their group-mates wait the home wait before the rest of
//! the pool is theirs too. A request of a tenant that already has another in
//! flight takes a free connection of the least busy group, or the first any group frees: a
//! busy tenant spreads over the pool instead of filling its home group, and its statements are prepared on more backends —
//! one tenant's, where a borrowing quiet tenant would spread all of them.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hashlink::LruCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::Type;

use crate::domain::state::TLS_PARAMS;

use super::{
    config::PoolConfig,
    error::ApiError,
    wire::{Step, WireConn, WireError},
};

/// Prepared statements kept per connection by default: one per (tenant table, query shape)
/// the connection has served. An evicted one is closed (deallocated) on the server with the
/// connection's next request.
pub const STATEMENT_CACHE: usize = 4096;

/// The name of the settings statement ([`super::tx::SETTINGS`]) on every connection.
pub(super) const SETTINGS_STATEMENT: &str = "tenantry_settings";

/// How long a request waits for its home group by default (`--pool-home-wait-ms`).
pub const HOME_WAIT: Duration = Duration::from_millis(20);

/// Connections per group (see the module documentation); a pool smaller than two groups is
/// one group.
pub const GROUP_SIZE: u32 = 4;

/// Why the pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid database URL: {0}")]
    Url(tokio_postgres::Error),
    #[error(transparent)]
    Database(#[from] WireError),
    #[error("the database URL asks for TLS (sslmode=require, verify-ca or verify-full), which the API's data path does not speak yet; connect over a trusted network or a local TLS-terminating proxy with sslmode=disable or prefer")]
    TlsRequired,
}

/// One pool for all tenants. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    cfg: PoolConfig,
    groups: Vec<Group>,
    /// Connections opened since the pool was: the first, replacements and recycles.
    opened: AtomicU64,
}

/// Some of the pool's connections. Its permits, one per connection the group may have, are
/// held by every lease and by every background replacement, so PostgreSQL never sees more
/// than `cfg.size` of ours in all.
struct Group {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Conn>>,
}

/// The sizes of the groups a pool of `size` connections is split into: as many groups of
/// [`GROUP_SIZE`] as fit, the remainder spread over them.
fn group_sizes(size: u32) -> Vec<u32> {
    let size = size.max(1);
    let n = (size / GROUP_SIZE).max(1);
    (0..n).map(|i| size / n + u32::from(i < size % n)).collect()
}

/// The home group of tenant `key` (its schema) among `n` groups (FNV-1a: stable across
/// processes).
pub fn home(key: &str, n: usize) -> usize {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % n as u64) as usize
}

/// An idle connection's session, as [`Pool::inspect_idle`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSession {
    /// The pool group the connection belongs to (see [`home`]).
    pub group: usize,
    pub current_user: String,
    pub search_path: String,
    /// Statements prepared on the server in this session.
    pub prepared: i64,
    /// Their texts.
    pub statements: Vec<String>,
}

/// One connection and its prepared statements.
pub(super) struct Conn {
    pub(super) wire: WireConn,
    /// Recycle after this instant: the configured lifetime less up to a quarter, at random,
    /// so that connections opened together are not all replaced together.
    retire_at: Instant,
    /// Statement name by SQL text, at most `capacity`.
    statements: LruCache<String, String>,
    capacity: usize,
    /// Statements evicted from the cache, to close with the next request.
    evicted: Vec<String>,
    next_name: u64,
}

impl Conn {
    /// The name of the prepared statement for `sql`, and whether it must be prepared (it is
    /// then remembered as prepared: a failed preparation must be [`Conn::forget`]-ed).
    pub(super) fn statement(&mut self, sql: &str) -> (String, bool) {
        if let Some(name) = self.statements.get(sql) {
            return (name.clone(), false);
        }
        if self.statements.len() >= self.capacity {
            if let Some((_, old)) = self.statements.remove_lru() {
                self.evicted.push(old);
            }
        }
        self.next_name += 1;
        let name = format!("s{}", self.next_name);
        self.statements.insert(sql.to_string(), name.clone());
        (name, true)
    }

    /// Drops the statement for `sql` from the cache and closes it on the server with the
    /// next request, whether or not its preparation got that far (closing a statement that
    /// does not exist is no error): after a failed request, nothing it may have prepared is
    /// left behind.
    pub(super) fn discard(&mut self, sql: &str) {
        if let Some(name) = self.statements.remove(sql) {
            self.evicted.push(name);
        }
    }

    /// Statements to close with the next request; the list is emptied.
    pub(super) fn take_evicted(&mut self) -> Vec<String> {
        std::mem::take(&mut self.evicted)
    }

    /// Puts statements whose closing did not complete back in the list.
    pub(super) fn restore_evicted(&mut self, names: Vec<String>) {
        self.evicted.extend(names);
    }

    fn is_closed(&self) -> bool {
        self.wire.is_broken()
    }
}

/// `url` without the TLS parameters a data path that speaks no TLS has no use for
/// (`sslrootcert`, `sslcert`, …, which the operator writes into the gateway Secret's URI when the
/// admin URL has them), or [`PoolError::TlsRequired`] when it demands TLS. Only the URL form
/// carries them; a key=value string is returned as it is.
fn without_tls(url: &str) -> Result<String, PoolError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let mut kept = Vec::new();
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "sslmode" && matches!(v, "require" | "verify-ca" | "verify-full") {
            return Err(PoolError::TlsRequired);
        }
        if k != "sslmode" && TLS_PARAMS.iter().any(|(n, _)| *n == k) {
            continue;
        }
        kept.push(kv);
    }
    Ok(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

impl Pool {
    /// A pool for `url` (a `postgres://` URL or key=value string), opening one connection
    /// now so that a bad URL or password shows at start.
    pub async fn open(url: &str, cfg: PoolConfig) -> Result<Self, PoolError> {
        let url = without_tls(url)?;
        let mut config = tokio_postgres::Config::from_str(&url).map_err(PoolError::Url)?;
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(PoolError::TlsRequired);
        }
        config
            .application_name("tenantry-api")
            .connect_timeout(cfg.acquire_timeout);
        let groups = group_sizes(cfg.size)
            .into_iter()
            .map(|n| Group {
                permits: Arc::new(Semaphore::new(n as usize)),
                idle: Mutex::new(Vec::new()),
            })
            .collect();
        let inner = Arc::new(Inner {
            config,
            cfg,
            groups,
            opened: AtomicU64::new(0),
        });
        let first = inner.connect().await?;
        inner.groups[0].idle.lock().expect("pool lock").push(first);
        Ok(Self { inner })
    }

    /// A connection to run one transaction on for tenant `key`: one of its home group's if
    /// one is free or frees up within the home wait, else the first free of any group (see
    /// [`Pool::permit`]). A request of a `crowded` tenant (another of its requests is in
    /// flight) takes a free connection of the least busy group: a busy tenant spreads over
    /// the pool rather than fill its home group. The connection returns to its group only
    /// when the lease says it ended cleanly (see [`Lease::clean`]).
    pub(super) async fn get(&self, key: &str, crowded: bool) -> Result<Lease, ApiError> {
        let (group, permit) = self
            .permit(home(key, self.inner.groups.len()), crowded)
            .await?;
        let groups = &self.inner.groups;
        let reused = loop {
            let c = groups[group].idle.lock().expect("pool lock").pop();
            match c {
                Some(c) if c.is_closed() => continue,
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
            group,
            clean: false,
        })
    }

    /// A permit for a request of a tenant whose home group is `home`, within the acquire
    /// timeout, counted from the call. A free one of the home group if there is one — for a
    /// `crowded` tenant, first a free one of the group with the most free connections, home
    /// winning ties. Otherwise the request queues at home (a crowded one at every group at
    /// once); once the home wait has passed it
    /// also takes the first connection any other group frees, keeping its place in the home
    /// group's queue. The home wait keeps each backend's share of the tenants at about
    /// `1 / groups` under steady load; it runs out only when the home group stays taken (say
    /// by slow statements).
    async fn permit(
        &self,
        home: usize,
        crowded: bool,
    ) -> Result<(usize, OwnedSemaphorePermit), ApiError> {
        type Wait = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = (
                            usize,
                            Result<OwnedSemaphorePermit, tokio::sync::AcquireError>,
                        ),
                    > + Send,
            >,
        >;
        let groups = &self.inner.groups;
        let cfg = &self.inner.cfg;
        let n = groups.len();
        let deadline = tokio::time::Instant::now() + cfg.acquire_timeout;
        let order = (0..n).map(|i| (home + i) % n);
        let free = |g: usize| groups[g].permits.available_permits();
        let roomiest = order.clone().max_by_key(|&g| (free(g), g == home));
        let first = if crowded { roomiest } else { Some(home) };
        for g in first.into_iter().chain([home]) {
            if let Ok(p) = groups[g].permits.clone().try_acquire_owned() {
                return Ok((g, p));
            }
        }
        let home_permits = groups[home].permits.clone();
        let mut at_home: Wait = Box::pin(async move { (home, home_permits.acquire_owned().await) });
        // A crowded tenant's request waits on every group at once: one tenant's many
        // requests queued at home would leave the other groups' connections idle.
        let home_wait = if n == 1 {
            cfg.acquire_timeout
        } else if crowded {
            Duration::ZERO
        } else {
            cfg.home_wait.min(cfg.acquire_timeout)
        };
        match tokio::time::timeout(home_wait, &mut at_home).await {
            Ok((g, Ok(p))) => return Ok((g, p)),
            Err(_) if n > 1 => {}
            _ => return Err(pool_exhausted()),
        }
        let mut waits = vec![at_home];
        for g in order.skip(1) {
            if let Ok(p) = groups[g].permits.clone().try_acquire_owned() {
                return Ok((g, p));
            }
            let permits = groups[g].permits.clone();
            waits.push(Box::pin(async move { (g, permits.acquire_owned().await) }));
        }
        match tokio::time::timeout_at(deadline, futures::future::select_all(waits)).await {
            Ok(((g, Ok(p)), _, _)) => Ok((g, p)),
            _ => Err(pool_exhausted()),
        }
    }

    /// The login role and whether it is a superuser or bypasses row-level security.
    pub(super) async fn login_role(&self) -> Result<(String, bool, bool), ApiError> {
        let mut lease = self.get("", false).await?;
        let rows = lease
            .conn()
            .wire
            .sync(&Step::unnamed(
                "SELECT rolname::pg_catalog.text, rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user",
            ))
            .await?;
        lease.clean = true;
        let row = rows
            .first()
            .ok_or_else(|| ApiError::internal("the login role is not in pg_roles"))?;
        Ok((row.string(0)?, row.bool(1)?, row.bool(2)?))
    }

    /// A diagnostic for tests and operators: what each idle connection's session looks like
    /// between transactions (the connections are taken out of the pool meanwhile), after
    /// closing the statements evicted from its cache: the current user and search_path (a tenant
    /// transaction must leave neither behind) and the statements prepared on the server (the
    /// settings statement included: what the cache bounds). Runs nothing but a catalog
    /// query, as the gateway.
    pub async fn inspect_idle(&self) -> Result<Vec<IdleSession>, WireError> {
        const INSPECT: &str = "SELECT current_user::pg_catalog.text, pg_catalog.current_setting('search_path'), (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements)::pg_catalog.text, (SELECT pg_catalog.string_agg(statement, pg_catalog.chr(30)) FROM pg_catalog.pg_prepared_statements)";
        let mut out = Vec::new();
        for (group, g) in self.inner.groups.iter().enumerate() {
            let idle: Vec<Conn> = std::mem::take(&mut *g.idle.lock().expect("pool lock"));
            let mut kept = Vec::new();
            let mut failed = None;
            for mut c in idle {
                let evicted = c.take_evicted();
                let mut steps: Vec<Step<'_>> = evicted.iter().map(|n| Step::Close(n)).collect();
                steps.extend(Step::unnamed(INSPECT));
                match c.wire.sync(&steps).await {
                    Ok(rows) => {
                        let row = rows
                            .first()
                            .ok_or_else(|| WireError::Protocol("no row".into()))?;
                        let statements = row.string(3).unwrap_or_default();
                        out.push(IdleSession {
                            group,
                            current_user: row.string(0)?,
                            search_path: row.string(1)?,
                            prepared: row.string(2)?.parse().unwrap_or(-1),
                            statements: statements
                                .split('\u{1e}')
                                .filter(|t| !t.is_empty())
                                .map(str::to_string)
                                .collect(),
                        });
                        kept.push(c);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            g.idle.lock().expect("pool lock").extend(kept);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Connections the pool may open at most.
    pub fn capacity(&self) -> u32 {
        self.inner.cfg.size.max(1)
    }

    /// Connections open now (idle or leased), as far as the permits tell.
    pub fn size(&self) -> usize {
        let available: usize = self
            .inner
            .groups
            .iter()
            .map(|g| g.permits.available_permits())
            .sum();
        self.capacity() as usize - available + self.num_idle()
    }

    pub fn num_idle(&self) -> usize {
        self.inner
            .groups
            .iter()
            .map(|g| g.idle.lock().expect("pool lock").len())
            .sum()
    }

    /// Connections opened since the pool was (the first, replacements of broken ones, and
    /// recycles at the end of their lifetime).
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// The number of connection groups (see the module documentation).
    pub fn groups(&self) -> usize {
        self.inner.groups.len()
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
    async fn connect(&self) -> Result<Conn, WireError> {
        // READ COMMITTED whatever the role's or the database's default: a request's
        // settings cannot set it, as they run once the transaction has its snapshot.
        let mut wire = WireConn::connect(
            &self.config,
            &[
                ("default_transaction_isolation", "read committed"),
                // A statement whose client went away stops within a second (PostgreSQL 14+).
                ("client_connection_check_interval", "1000"),
            ],
        )
        .await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        wire.sync(&[Step::Parse {
            name: SETTINGS_STATEMENT,
            sql: super::tx::SETTINGS,
            types: &[Type::TEXT; 6],
        }])
        .await?;
        let life = self.cfg.max_lifetime.as_secs_f64() * (1.0 - rand::random::<f64>() / 4.0);
        Ok(Conn {
            wire,
            retire_at: Instant::now() + Duration::from_secs_f64(life),
            statements: LruCache::new_unbounded(),
            capacity: self.cfg.statement_cache.max(1),
            evicted: Vec::new(),
            next_name: 0,
        })
    }
}

/// A leased connection. Dropped with `clean` unset — the request failed mid-exchange or was
/// cancelled before the server's answer to its `Sync` — the connection is closed,
/// never returned: it may be inside a transaction, with the tenant's role set, or with
/// statements still in flight.
pub(super) struct Lease {
    conn: Option<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Inner>,
    group: usize,
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
        if !self.clean {
            // The request failed or was cancelled mid-exchange: its statement may still be
            // running (the server notices a closed socket only when it next writes). Cancel
            // it before the permit lets another connection open, so that abandoned requests
            // never hold more backends than the pool has connections.
            let cancel = conn.wire.cancel_token();
            drop(conn);
            if let Some(token) = cancel {
                tokio::spawn(async move {
                    let _ = token.cancel().await;
                    drop(permit);
                });
            }
            return;
        }
        if conn.is_closed() {
            return; // conn dropped: closed; the permit frees its slot
        }
        let idle = &self.pool.groups[self.group].idle;
        if Instant::now() < conn.retire_at {
            idle.lock().expect("pool lock").push(conn);
            return;
        }
        // Recycle off the request path: the replacement connects under the retiring
        // connection's permit, so the pool never exceeds its size and no request waits.
        let (pool, group) = (self.pool.clone(), self.group);
        drop(conn);
        tokio::spawn(async move {
            if let Ok(c) = pool.connect().await {
                pool.groups[group].idle.lock().expect("pool lock").push(c);
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_file_parameters_are_dropped_and_demanded_tls_refused() {
        let u = "postgresql://gw:pw@db:5432/app?sslmode=prefer&sslrootcert=%2Fca&sslnegotiation=direct&application_name=x";
        assert_eq!(
            without_tls(u).unwrap(),
            "postgresql://gw:pw@db:5432/app?sslmode=prefer&application_name=x"
        );
        assert_eq!(
            without_tls("postgresql://gw@db/app?sslcert=a").unwrap(),
            "postgresql://gw@db/app"
        );
        for mode in ["require", "verify-ca", "verify-full"] {
            assert!(matches!(
                without_tls(&format!("postgresql://gw@db/app?sslmode={mode}")),
                Err(PoolError::TlsRequired)
            ));
        }
        assert_eq!(without_tls("host=db user=gw").unwrap(), "host=db user=gw");
    }

    #[test]
    fn pools_split_into_groups_of_four_with_the_remainder_spread() {
        assert_eq!(group_sizes(0), [1]);
        assert_eq!(group_sizes(3), [3]);
        assert_eq!(group_sizes(4), [4]);
        assert_eq!(group_sizes(7), [7]);
        assert_eq!(group_sizes(16), [4, 4, 4, 4]);
        assert_eq!(group_sizes(18), [5, 5, 4, 4]);
        for size in 1..200 {
            assert_eq!(group_sizes(size).iter().sum::<u32>(), size);
        }
    }

    #[test]
    fn tenants_spread_over_home_groups_and_keep_theirs() {
        let mut per_group = [0; 4];
        for i in 0..4000 {
            per_group[home(&format!("tenant-{i}"), 4)] += 1;
        }
        assert!(
            per_group.iter().all(|&n| (800..1200).contains(&n)),
            "{per_group:?}"
        );
        assert_eq!(home("acme", 4), home("acme", 4));
        assert_eq!(home("acme", 1), 0);
    }
}
