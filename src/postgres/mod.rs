//! Everything the operator does in PostgreSQL: observing a tenant's role and schema,
//! creating them with the right ownership and privileges, setting passwords, running
//! migrations and tearing tenants down. Identifiers arrive validated ([`Ident`]) and reach SQL
//! quoted; values are bound parameters.

pub mod fingerprint;
pub mod lint;
pub mod migrations;
pub mod plan;
pub mod tenant;

use std::{str::FromStr, time::Duration};

use futures::{future::BoxFuture, FutureExt};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, PgPool,
};

use crate::domain::{
    naming::{quote_literal, Ident},
    scram,
    state::{Endpoint, Owner, TlsParamError},
};

/// Whether a database error is worth retrying unchanged (connection trouble, lock timeouts,
/// serialization failures, shutdown) rather than a problem with the SQL itself.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception, 40: transaction rollback, 53: insufficient resources,
            // 55P03: lock not available, 57: operator intervention (shutdown, cancel).
            c.starts_with("08")
                || c.starts_with("40")
                || c.starts_with("53")
                || c == "55P03"
                || c.starts_with("57")
        }),
        _ => false,
    }
}

/// Why an [`Admin`] operation that writes a tenant's ownership mark failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The mark (JSON of the Tenant's namespace, name and uid) cannot be written as an SQL
    /// literal. Kubernetes names and uids never make this happen.
    #[error("tenant identity contains characters that cannot be quoted")]
    UnquotableMark,
}

impl Error {
    /// Whether retrying unchanged could help (see [`is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => is_transient(e),
            Error::UnquotableMark => false,
        }
    }
}

/// The ownership mark of `owner`, quoted for `COMMENT ON`.
fn mark(owner: &Owner) -> Result<String, Error> {
    quote_literal(&owner.comment()).ok_or(Error::UnquotableMark)
}

/// Default `CONNECTION LIMIT` of tenant app roles.
pub const DEFAULT_TENANT_CONNECTION_LIMIT: i32 = 20;

/// Time limits of the operator's admin sessions, so that a tenant holding a lock (or the
/// advisory lock of a migration) costs only that tenant a retry, never a stuck reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `lock_timeout` of every admin statement.
    pub lock_ms: u64,
    /// `statement_timeout` of every admin statement but migrations.
    pub statement_ms: u64,
    /// `statement_timeout` inside a migration transaction.
    pub migration_ms: u64,
    /// `lock_timeout` of every migration statement and of the wait for a schema's migration
    /// lock (`--migration-lock-timeout-ms`).
    pub migration_lock_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            lock_ms: 5_000,
            statement_ms: 30_000,
            migration_ms: 600_000,
            migration_lock_ms: migrations::DEFAULT_LOCK_TIMEOUT_MS,
        }
    }
}

/// The operator's admin connection pool and what it learned about its own privileges.
#[derive(Clone)]
pub struct Admin {
    pool: PgPool,
    superuser: bool,
    endpoint: Endpoint,
    gateway: Option<Ident>,
    timeouts: Timeouts,
    /// Concurrent sessions each tenant's app role may open (-1: unlimited), so that one
    /// tenant cannot take every connection of the server.
    connection_limit: i32,
    /// The TLS parameters set over the admin URL's for tenants ([`Admin::with_tenant_tls`]),
    /// which other servers' admins ([`Admin::sibling`]) set too.
    tenant_tls: Vec<(String, String)>,
}

/// Connection options for `url` with statement logging off: DDL carrying password verifiers
/// must never reach the logs.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("tenantry")
        .disable_statement_logging())
}

/// The TLS parameters ([`crate::domain::state::TLS_PARAMS`]) in a connection URL's query, percent-decoded, in that
/// order; values libpq would refuse are left out (the admin connection fails on them anyway).
fn url_tls(url: &str) -> Vec<(String, String)> {
    let mut ep = Endpoint {
        host: String::new(),
        port: 0,
        dbname: String::new(),
        tls: Vec::new(),
    };
    if let Some((_, query)) = url.split_once('?') {
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            let _ = ep.set_tls_param(k, &v);
        }
    }
    ep.tls
}

impl Admin {
    /// A lazily connecting pool: the operator starts (and reports not-ready) while the database
    /// is down, and recovers by itself when it comes back.
    pub fn new(
        url: &str,
        max_connections: u32,
        public_host: Option<String>,
        public_port: Option<u16>,
    ) -> Result<Self, sqlx::Error> {
        let timeouts = Timeouts::default();
        // Whose code runs in this session: the session user acts for every tenant, so nothing a
        // tenant could create may be found here — `search_path` is `pg_catalog` alone (no
        // `public`, no `$user`), and every statement is bounded in time.
        let opts = connect_options(url)?.options([
            ("search_path", "pg_catalog".to_string()),
            ("lock_timeout", timeouts.lock_ms.to_string()),
            ("statement_timeout", timeouts.statement_ms.to_string()),
        ]);
        let endpoint = Endpoint {
            host: public_host.unwrap_or_else(|| opts.get_host().to_string()),
            port: public_port.unwrap_or_else(|| opts.get_port()),
            dbname: opts.get_database().unwrap_or("postgres").to_string(),
            tls: url_tls(url),
        };
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts);
        Ok(Self {
            pool,
            superuser: false,
            endpoint,
            gateway: None,
            timeouts,
            connection_limit: DEFAULT_TENANT_CONNECTION_LIMIT,
            tenant_tls: Vec::new(),
        })
    }

    /// TLS parameters written into credentials, over the admin URL's: each `(name, value)`
    /// sets one (an empty value removes it). Checked with [`crate::domain::state::check_tls_param`].
    pub fn with_tenant_tls<'a>(
        mut self,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TlsParamError> {
        for (name, value) in params {
            self.endpoint.set_tls_param(name, value)?;
            self.tenant_tls.push((name.to_string(), value.to_string()));
        }
        Ok(self)
    }

    /// Makes every tenant role provisioned from now on a role that `gateway` may switch to.
    pub fn with_gateway(mut self, gateway: Option<Ident>) -> Self {
        self.gateway = gateway;
        self
    }

    /// Sets the `CONNECTION LIMIT` of every tenant's app role (-1: unlimited); existing roles
    /// are brought in line at their next full reconcile.
    pub fn with_tenant_connection_limit(mut self, limit: i32) -> Self {
        self.connection_limit = limit;
        self
    }

    /// Sets the `lock_timeout` of migrations (milliseconds, at least 1): how long a migration
    /// waits for a lock a tenant's own transaction holds before it gives up with
    /// [`migrations::MigrateError::LockTimeout`] (retryable).
    pub fn with_migration_lock_timeout(mut self, ms: u64) -> Self {
        self.timeouts.migration_lock_ms = ms.max(1);
        self
    }

    /// The time limits of migration runs.
    pub fn migration_limits(&self) -> migrations::Limits {
        migrations::Limits {
            statement_timeout_ms: self.timeouts.migration_ms,
            lock_timeout_ms: self.timeouts.migration_lock_ms,
        }
    }

    pub fn gateway(&self) -> Option<&Ident> {
        self.gateway.as_ref()
    }

    /// Creates the gateway role (LOGIN, NOINHERIT, no other attributes) if it is missing, and
    /// sets its password.
    pub async fn ensure_gateway(&self, password: &str) -> Result<(), sqlx::Error> {
        let Some(gw) = &self.gateway else {
            return Ok(());
        };
        let verifier = quote_literal(&scram::verifier(password)).expect("verifier is base64");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(gw.as_str())
                .fetch_one(&self.pool)
                .await?;
        if !exists {
            let created = sqlx::Executor::execute(
                &self.pool,
                format!(
                    "CREATE ROLE {gw} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE \
                     NOREPLICATION NOBYPASSRLS PASSWORD {verifier}"
                )
                .as_str(),
            )
            .await;
            match created {
                Ok(_) => return Ok(()),
                // Another operator created it meanwhile.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
                Err(e) => return Err(e),
            }
        }
        sqlx::Executor::execute(
            &self.pool,
            format!("ALTER ROLE {gw} PASSWORD {verifier}").as_str(),
        )
        .await?;
        Ok(())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Checks the database answers and prepares database-wide settings: learns whether the
    /// admin role is a superuser, and makes sure no role may create objects in `public`
    /// (the PostgreSQL 15 default, enforced for older servers and altered databases too).
    pub async fn bootstrap(&mut self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.superuser =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                .fetch_one(&mut *conn)
                .await?;
        let public_create: bool = sqlx::query_scalar(
            "SELECT has_schema_privilege('public', 'public', 'CREATE') \
             FROM pg_namespace WHERE nspname = 'public' UNION ALL SELECT false LIMIT 1",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(false);
        if public_create {
            sqlx::query("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// The admin of another server (`url`), with this one's settings: gateway role, time
    /// limits, tenants' connection limit, the TLS parameters set for tenants.
    pub fn sibling(
        &self,
        url: &str,
        max_connections: u32,
        public_host: Option<String>,
        public_port: Option<u16>,
    ) -> Result<Self, sqlx::Error> {
        let mut admin = Admin::new(url, max_connections, public_host, public_port)?;
        admin.gateway = self.gateway.clone();
        admin.timeouts = self.timeouts;
        admin.connection_limit = self.connection_limit;
        for (name, value) in &self.tenant_tls {
            // Checked when this admin took them.
            let _ = admin.endpoint.set_tls_param(name, value);
        }
        admin.tenant_tls = self.tenant_tls.clone();
        Ok(admin)
    }

    /// The server's version and the size of the database in bytes.
    pub async fn describe(&self) -> Result<(String, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT pg_catalog.current_setting('server_version'), \
             pg_catalog.pg_database_size(pg_catalog.current_database())",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Cheap liveness probe of the database.
    pub async fn ping(&self) -> bool {
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Sets a new password on the role (as a SCRAM verifier).
    pub async fn set_password(&self, id: &Ident, password: &str) -> Result<(), sqlx::Error> {
        let verifier = quote_literal(&scram::verifier(password)).expect("verifier is base64");
        sqlx::Executor::execute(
            &self.pool,
            format!("ALTER ROLE {id} PASSWORD {verifier}").as_str(),
        )
        .await?;
        Ok(())
    }

    /// Applied migrations of the schema (read without locking, for the no-op check), after
    /// checking that the history table is one the operator may read.
    ///
    /// Boxed, like [`Admin::migrate`], so that callers' futures are `Send` for any lifetime
    /// (rustc cannot prove that through sqlx's `Executor` for `&mut PgConnection`).
    pub fn applied_migrations<'a>(
        &'a self,
        names: &'a tenant::Names,
    ) -> BoxFuture<'a, Result<Vec<migrations::Applied>, migrations::MigrateError>> {
        async move {
            let mut conn = self.pool.acquire().await?;
            migrations::applied(&mut conn, names).await
        }
        .boxed()
    }

    /// Size of the admin connection pool.
    pub fn pool_size(&self) -> u32 {
        self.pool.options().get_max_connections()
    }

    /// Runs pending migrations in the schema as the tenant's owner role (see
    /// [`migrations::migrate`]), each statement bounded by the migration `lock_timeout`
    /// ([`Admin::with_migration_lock_timeout`]). After an error the connection is closed, never
    /// returned to the pool: it may still hold the owner role, the schema's `search_path` or
    /// the schema's advisory lock.
    pub fn migrate<'a>(
        &'a self,
        names: &'a tenant::Names,
        set: &'a migrations::MigrationSet,
    ) -> BoxFuture<'a, Result<Vec<i64>, migrations::MigrateError>> {
        async move {
            let mut conn = self.pool.acquire().await?;
            let result = migrations::migrate(&mut conn, names, set, self.migration_limits()).await;
            if result.is_err() {
                conn.close_on_drop();
            }
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_admin_urls_tls_parameters_reach_the_endpoint_unless_overridden() {
        let url = "postgres://a@db:5432/app?sslmode=require&sslrootcert=%2Fetc%2Fca.crt&application_name=x&sslpassword=s";
        let admin = Admin::new(url, 1, None, None).unwrap();
        assert_eq!(
            admin.endpoint().tls,
            [
                ("sslmode".to_string(), "require".to_string()),
                ("sslrootcert".to_string(), "/etc/ca.crt".to_string())
            ]
        );
        let admin = admin
            .with_tenant_tls([
                ("sslmode", "verify-full"),
                ("sslrootcert", ""),
                ("sslcert", "/c"),
            ])
            .unwrap();
        assert_eq!(admin.endpoint().tls_param("sslmode"), Some("verify-full"));
        assert_eq!(admin.endpoint().tls_param("sslrootcert"), None);
        assert_eq!(admin.endpoint().tls_param("sslcert"), Some("/c"));
        assert!(admin.clone().with_tenant_tls([("sslkey2", "x")]).is_err());
        let admin = Admin::new("postgres://a@db:5432/app", 1, None, None).unwrap();
        assert!(admin.endpoint().tls.is_empty());
    }

    #[test]
    fn transient_errors() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn an_unquotable_mark_is_its_own_permanent_error() {
        assert!(mark(&Owner::new("ns", "acme", "uid-1")).is_ok());
        let err = mark(&Owner::new("ns", "a\\b", "uid-1")).unwrap_err();
        assert!(matches!(err, Error::UnquotableMark));
        assert!(!err.is_transient());
    }
}
