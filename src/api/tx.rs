//! One request, one transaction: [`in_tenant`] switches the pooled connection to the tenant's
//! role and schema for the length of a transaction, and [`CatalogCache`] remembers each tenant
//! schema's tables per migration version so that requests do not re-read the catalog.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::StatusCode;
use tokio_postgres::types::{ToSql, Type};

use super::{
    config::Limits,
    error::ApiError,
    pool::{Lease, Pool, SETTINGS_STATEMENT},
    query::{Bind, Catalog, Sql},
    wire::{Row, Step, WireError},
};
use crate::domain::naming::Ident;

/// Runs `sql` in one transaction as the tenant role with the tenant schema as search_path,
/// and returns its rows; `crowded` as for [`Pool::get`].
///
/// Whose code runs in this session: the session user is the gateway role (refused by
/// `connect` if it is a superuser or bypasses RLS), which is a member of every tenant role;
/// the settings statement makes the tenant the current user for this transaction only
/// (`set_config('role', …, true)`, the same check as `SET LOCAL ROLE`). Tenant-made
/// functions, triggers and defaults that a statement fires run in this session, whose
/// session user outranks the tenant.
///
/// One flight: the settings (a statement prepared once per connection, its values bound),
/// the statement's preparation if this connection has not prepared it yet (after the
/// settings, so that it is parsed as the tenant), and the statement leave in one write
/// ending in one `Sync`; PostgreSQL runs them as one implicit transaction. If the settings
/// fail — say the role is refused — the server skips everything up to the `Sync`: the
/// statement never runs as the gateway. Reads and writes alike: a write commits at that
/// `Sync` (or, failing, rolls back), as an autocommit statement would. A request dropped
/// while its statement runs has its connection cancelled and closed (see [`Lease`]): a
/// statement still running is cancelled and rolled back; one that already finished has
/// committed, as with any client that hangs up after sending; and a write whose connection
/// breaks before the answer is refused with 502 `write-outcome-unknown`, not a "retry".
///
/// The connection goes back to the pool only once the transaction has ended cleanly; see
/// [`Lease`].
pub(super) async fn in_tenant(
    pool: &Pool,
    schema: &Ident,
    read_only: bool,
    limits: &Limits,
    sql: &Sql,
    crowded: bool,
) -> Result<Vec<Row>, ApiError> {
    let settings = TenantSettings::new(schema, read_only, sql.generic_plan, limits);
    let mut lease = pool.get(schema.as_str(), crowded).await?;
    let out = match run(&mut lease, &settings, sql, limits).await {
        // The connection lost the statement (26000: deallocated behind our back) or cannot
        // reuse its plan (0A000: result type changed): forget it and run the transaction once
        // more, preparing afresh. Neither ran the statement.
        Err(e) if lease.clean && stale_statement(&e) => {
            lease.conn().discard(&sql.text);
            run(&mut lease, &settings, sql, limits).await
        }
        out => out,
    };
    out.map_err(|e| match e {
        // The write and its commit were sent and no answer came back (the connection broke,
        // or the exchange deadline passed): it may have committed. Not "retry": a retried
        // POST could insert twice.
        WireError::Io(_) if !read_only => {
            tracing::warn!(error = %e, "write sent, no answer");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "write-outcome-unknown",
                "the connection to the database was lost after the write was sent, so whether it committed is not known; read the rows before retrying",
            )
        }
        e => e.into(),
    })
}

/// 26000 (no such statement) or 0A000 (here: "cached plan must not change result type";
/// matched by code, as the message is translated under other `lc_messages`). Both are
/// raised at Bind, so the statement did not run.
fn stale_statement(e: &WireError) -> bool {
    matches!(e, WireError::Db(d) if d.code == "26000" || d.code == "0A000")
}

/// What a tenant transaction sets, as the values bound to [`SETTINGS`].
pub(super) struct TenantSettings {
    /// The tenant role's name as PostgreSQL stores it (`role` takes a name, not SQL).
    role: String,
    /// The search_path value: the quoted schema, then `pg_temp` (see [`SETTINGS`]).
    search_path: String,
    statement_timeout: String,
    lock_timeout: String,
    read_only: &'static str,
    plan_cache_mode: &'static str,
}

impl TenantSettings {
    pub(super) fn new(
        schema: &Ident,
        read_only: bool,
        generic_plan: bool,
        limits: &Limits,
    ) -> Self {
        Self {
            role: schema.as_str().to_string(),
            search_path: format!("{schema}, pg_temp"),
            statement_timeout: limits.statement_timeout_ms.to_string(),
            lock_timeout: limits.lock_timeout_ms.to_string(),
            read_only: if read_only { "on" } else { "off" },
            plan_cache_mode: if generic_plan {
                "force_generic_plan"
            } else {
                "auto"
            },
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.role,
            &self.search_path,
            &self.statement_timeout,
            &self.lock_timeout,
            &self.read_only,
            &self.plan_cache_mode,
        ]
    }
}

/// The statement that switches a transaction to a tenant: one statement, the same text for
/// every tenant (so one prepared statement per connection), with the values bound.
/// `pg_temp` is named last in the search_path because, left out, it is searched first for
/// relations and types (ahead of the tenant's schema and even of pg_catalog, which stays
/// implicitly first). `lock_timeout` bounds how long a request waits on a lock the tenant
/// holds from a session of its own (55P03, served as 503 `lock-timeout`), so such a lock
/// cannot pin pool connections for the whole statement timeout. A read's transaction is
/// made read-only, and a statement marked [`Sql::generic_plan`] is planned once. Every function is named with its schema: the statement runs before the
/// role and search_path are set.
pub(super) const SETTINGS: &str = "SELECT pg_catalog.set_config('role', $1, true), pg_catalog.set_config('search_path', $2, true), pg_catalog.set_config('statement_timeout', $3, true), pg_catalog.set_config('lock_timeout', $4, true), pg_catalog.set_config('transaction_read_only', $5, true), pg_catalog.set_config('plan_cache_mode', $6, true)";

const SETTINGS_TYPES: [Type; 6] = [Type::TEXT; 6];

/// How long past the statement timeout an exchange may take before the connection is given
/// up (a half-open socket, a stalled server): the request fails and the connection is
/// cancelled and closed.
const EXCHANGE_MARGIN: Duration = Duration::from_secs(5);

async fn run(
    lease: &mut Lease,
    settings: &TenantSettings,
    sql: &Sql,
    limits: &Limits,
) -> Result<Vec<Row>, WireError> {
    let deadline = Duration::from_millis(limits.statement_timeout_ms) + EXCHANGE_MARGIN;
    tokio::time::timeout(deadline, exchange(lease, settings, sql))
        .await
        .unwrap_or_else(|_| {
            Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the database did not answer in time",
            )))
        })
}

async fn exchange(
    lease: &mut Lease,
    settings: &TenantSettings,
    sql: &Sql,
) -> Result<Vec<Row>, WireError> {
    lease.clean = false;
    let params: Vec<&(dyn ToSql + Sync)> = sql.binds.iter().map(Bind::as_param).collect();
    let types: Vec<Type> = sql.binds.iter().map(Bind::pg_type).collect();
    let set_params = settings.params();
    let conn = lease.conn();
    let (name, prepare) = conn.statement(&sql.text);
    let evicted = conn.take_evicted();
    let mut steps: Vec<Step<'_>> = evicted.iter().map(|n| Step::Close(n)).collect();
    steps.push(Step::Execute {
        statement: SETTINGS_STATEMENT,
        params: &set_params,
        types: &SETTINGS_TYPES,
    });
    if prepare {
        steps.push(Step::Parse {
            name: &name,
            sql: &sql.text,
            types: &types,
        });
    }
    steps.push(Step::Execute {
        statement: &name,
        params: &params,
        types: &types,
    });
    let out = conn.wire.sync(&steps).await;
    match &out {
        // The server answered: the transaction ended (committed or rolled back) and the
        // session is clean. A failed request may or may not have prepared its statement
        // (Parse succeeds before a bad value fails at Bind or Execute), and left the closes
        // unsent: close the one, send the others again.
        Ok(_) => lease.clean = true,
        Err(WireError::Db(_)) if !conn.wire.is_broken() => {
            if prepare {
                conn.discard(&sql.text);
            }
            conn.restore_evicted(evicted);
            lease.clean = true;
        }
        Err(_) => {}
    }
    out
}

/// The single text value of a statement built by [`super::query`].
pub(super) fn json_text(rows: Vec<Row>) -> Result<String, ApiError> {
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("statement returned no row"))?;
    row.string(0).map_err(ApiError::internal)
}

/// A schema's catalog and the migration version it was read at.
type VersionedCatalog = (Option<i64>, Arc<Catalog>);

/// Catalog of each tenant schema, keyed by schema, valid for one migration version.
#[derive(Default)]
pub(super) struct CatalogCache {
    entries: Mutex<HashMap<String, VersionedCatalog>>,
}

impl CatalogCache {
    /// The catalog of `schema` at migration `version`, read in a transaction of its own as
    /// the tenant when the cache has none for that version.
    pub(super) async fn get(
        &self,
        pool: &Pool,
        schema: &Ident,
        version: Option<i64>,
        limits: &Limits,
        crowded: bool,
    ) -> Result<Arc<Catalog>, ApiError> {
        let key = schema.as_str();
        if let Some((v, c)) = self.entries.lock().expect("catalog lock").get(key) {
            if *v == version {
                return Ok(c.clone());
            }
        }
        let rows = in_tenant(
            pool,
            schema,
            true,
            limits,
            &Catalog::statement(key),
            crowded,
        )
        .await?;
        let c = Arc::new(Catalog::from_rows(rows)?);
        self.entries
            .lock()
            .expect("catalog lock")
            .insert(key.to_string(), (version, c.clone()));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_bind_the_role_name_and_put_pg_temp_last() {
        let schema = Ident::parse("schema", "acme").unwrap();
        let limits = Limits {
            statement_timeout_ms: 1,
            lock_timeout_ms: 0,
            ..Limits::default()
        };
        let s = TenantSettings::new(&schema, true, false, &limits);
        assert_eq!(s.role, "acme");
        assert_eq!(s.search_path, r#""acme", pg_temp"#);
        assert_eq!(
            (s.statement_timeout.as_str(), s.lock_timeout.as_str()),
            ("1", "0")
        );
        assert_eq!(s.read_only, "on");
        assert_eq!(
            TenantSettings::new(&schema, false, true, &limits).read_only,
            "off"
        );
    }
}
