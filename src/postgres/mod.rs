//! Everything the operator does in PostgreSQL: observing a tenant's role and schema,
//! creating them with the right ownership and privileges, setting passwords, running
//! migrations and tearing tenants down. Identifiers arrive validated ([`Ident`]) and reach SQL
//! quoted; values are bound parameters.

pub mod migrations;

use std::{str::FromStr, time::Duration};

use futures::{future::BoxFuture, FutureExt};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, PgPool,
};

use crate::domain::{
    naming::{quote_literal, Ident},
    scram,
    state::{Endpoint, Observed, Owner, RoleState, SchemaState},
};

/// Role exists, rolcanlogin, gateway member, role comment, verifier, schema exists, schema
/// owner, schema comment.
type ObservedRow = (
    bool,
    Option<bool>,
    bool,
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
    Option<String>,
);

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

/// The operator's admin connection pool and what it learned about its own privileges.
#[derive(Clone)]
pub struct Admin {
    pool: PgPool,
    superuser: bool,
    endpoint: Endpoint,
    gateway: Option<Ident>,
}

/// Connection options for `url` with statement logging off: DDL carrying password verifiers
/// must never reach the logs.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("tenantry")
        .disable_statement_logging())
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
        let opts = connect_options(url)?;
        let endpoint = Endpoint {
            host: public_host.unwrap_or_else(|| opts.get_host().to_string()),
            port: public_port.unwrap_or_else(|| opts.get_port()),
            dbname: opts.get_database().unwrap_or("postgres").to_string(),
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
        })
    }

    /// Makes every tenant role provisioned from now on a role that `gateway` may switch to.
    pub fn with_gateway(mut self, gateway: Option<Ident>) -> Self {
        self.gateway = gateway;
        self
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

    /// Cheap liveness probe of the database.
    pub async fn ping(&self) -> bool {
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Reads the state of the role and the schema named `id`, in one round trip.
    pub async fn observe(&self, id: &Ident) -> Result<Observed, sqlx::Error> {
        let verifier_expr = if self.superuser {
            "(SELECT a.rolpassword FROM pg_authid a WHERE a.rolname = x.nm)"
        } else {
            "NULL::text"
        };
        let row: ObservedRow = sqlx::query_as(&format!(
            "SELECT r.oid IS NOT NULL, r.rolcanlogin, \
                    EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.member \
                            WHERE m.roleid = r.oid AND g.rolname = $2), \
                    shobj_description(r.oid, 'pg_authid'), {verifier_expr}, \
                    n.oid IS NOT NULL, pg_get_userbyid(n.nspowner), obj_description(n.oid, 'pg_namespace') \
             FROM (SELECT $1::name AS nm) x \
             LEFT JOIN pg_roles r ON r.rolname = x.nm \
             LEFT JOIN pg_namespace n ON n.nspname = x.nm"
        ))
        .bind(id.as_str())
        .bind(self.gateway.as_ref().map(|g| g.as_str().to_string()))
        .fetch_one(&self.pool)
        .await?;
        let (
            role_exists,
            can_login,
            gateway_member,
            role_comment,
            verifier,
            schema_exists,
            owner_role,
            schema_comment,
        ) = row;
        Ok(Observed {
            role: role_exists.then(|| RoleState {
                can_login: can_login.unwrap_or(false),
                gateway_member,
                owner: Owner::parse(role_comment.as_deref()),
                verifier,
            }),
            schema: schema_exists.then(|| SchemaState {
                owner_role: owner_role.unwrap_or_default(),
                owner: Owner::parse(schema_comment.as_deref()),
            }),
        })
    }

    /// Creates the tenant role with LOGIN and the given password (sent as a SCRAM verifier),
    /// marks it as this Tenant's, lets the admin role act as it, and pins its search_path.
    /// One transaction: either all of it exists afterwards or none of it.
    pub async fn create_role(
        &self,
        id: &Ident,
        owner: &Owner,
        password: &str,
    ) -> Result<(), Error> {
        let verifier = quote_literal(&scram::verifier(password)).expect("verifier is base64");
        let comment = mark(owner)?;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(
            &mut *tx,
            format!(
            "CREATE ROLE {id} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
                 INHERIT PASSWORD {verifier};\n\
             COMMENT ON ROLE {id} IS {comment};\n\
             ALTER ROLE {id} SET search_path TO {id};"
        )
            .as_str(),
        )
        .await?;
        if !self.superuser {
            // A non-superuser admin needs membership to create the schema for the role and to
            // run migrations as it.
            sqlx::Executor::execute(&mut *tx, format!("GRANT {id} TO CURRENT_USER").as_str())
                .await?;
        }
        if let Some(gw) = &self.gateway {
            sqlx::Executor::execute(&mut *tx, format!("GRANT {id} TO {gw}").as_str()).await?;
        }
        Ok(tx.commit().await?)
    }

    /// Brings an existing role of this Tenant back in line: LOGIN on, mark refreshed.
    pub async fn adopt_role(
        &self,
        id: &Ident,
        owner: &Owner,
        state: &RoleState,
    ) -> Result<bool, Error> {
        let mut stmts = Vec::new();
        if !state.can_login {
            stmts.push(format!("ALTER ROLE {id} LOGIN"));
        }
        if state.owner.as_ref() != Some(owner) {
            let comment = mark(owner)?;
            stmts.push(format!("COMMENT ON ROLE {id} IS {comment}"));
        }
        if let (Some(gw), false) = (&self.gateway, state.gateway_member) {
            stmts.push(format!("GRANT {id} TO {gw}"));
        }
        if stmts.is_empty() {
            return Ok(false);
        }
        sqlx::Executor::execute(&self.pool, stmts.join(";\n").as_str()).await?;
        Ok(true)
    }

    /// Creates the schema owned by the tenant role, marked as this Tenant's, closed to PUBLIC.
    pub async fn create_schema(&self, id: &Ident, owner: &Owner) -> Result<(), Error> {
        let comment = mark(owner)?;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(
            &mut *tx,
            format!(
                "CREATE SCHEMA {id} AUTHORIZATION {id};\n\
             COMMENT ON SCHEMA {id} IS {comment};\n\
             REVOKE ALL ON SCHEMA {id} FROM PUBLIC;"
            )
            .as_str(),
        )
        .await?;
        Ok(tx.commit().await?)
    }

    /// Brings an existing schema of this Tenant back in line: owned by the role, mark refreshed.
    pub async fn adopt_schema(
        &self,
        id: &Ident,
        owner: &Owner,
        state: &SchemaState,
    ) -> Result<bool, Error> {
        let mut stmts = Vec::new();
        if state.owner_role != id.as_str() {
            stmts.push(format!("ALTER SCHEMA {id} OWNER TO {id}"));
        }
        if state.owner.as_ref() != Some(owner) {
            let comment = mark(owner)?;
            stmts.push(format!("COMMENT ON SCHEMA {id} IS {comment}"));
        }
        if stmts.is_empty() {
            return Ok(false);
        }
        sqlx::Executor::execute(&self.pool, stmts.join(";\n").as_str()).await?;
        Ok(true)
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

    /// Applied migrations of the schema (read without locking, for the no-op check).
    ///
    /// Boxed, like [`Admin::migrate`], so that callers' futures are `Send` for any lifetime
    /// (rustc cannot prove that through sqlx's `Executor` for `&mut PgConnection`).
    pub fn applied_migrations<'a>(
        &'a self,
        id: &'a Ident,
    ) -> BoxFuture<'a, Result<Vec<migrations::Applied>, sqlx::Error>> {
        async move {
            let mut conn = self.pool.acquire().await?;
            migrations::applied(&mut conn, id).await
        }
        .boxed()
    }

    /// Runs pending migrations in the schema as the tenant role.
    pub fn migrate<'a>(
        &'a self,
        id: &'a Ident,
        set: &'a migrations::MigrationSet,
    ) -> BoxFuture<'a, Result<Vec<i64>, migrations::MigrateError>> {
        async move {
            let mut conn = self.pool.acquire().await?;
            migrations::migrate(&mut conn, id, set).await
        }
        .boxed()
    }

    /// `Retain` deletion: the role keeps its schema and data but can no longer log in, and its
    /// open sessions end.
    pub async fn retain(&self, id: &Ident) -> Result<(), sqlx::Error> {
        let mut sql = format!("ALTER ROLE {id} NOLOGIN");
        if let Some(gw) = &self.gateway {
            // The API must stop serving a deleted tenant even if its registry lags.
            sql.push_str(&format!(";\nREVOKE {id} FROM {gw}"));
        }
        sqlx::Executor::execute(&self.pool, sql.as_str()).await?;
        self.terminate_sessions(id).await
    }

    async fn terminate_sessions(&self, id: &Ident) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `Delete` deletion: ends the role's sessions, drops the schema with everything in it
    /// (only when `drop_schema`, i.e. it carries this Tenant's mark) and the role (only when
    /// `drop_role`).
    pub async fn drop_tenant(
        &self,
        id: &Ident,
        drop_schema: bool,
        drop_role: bool,
    ) -> Result<(), sqlx::Error> {
        if drop_role {
            sqlx::Executor::execute(&self.pool, format!("ALTER ROLE {id} NOLOGIN").as_str())
                .await?;
            self.terminate_sessions(id).await?;
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        if drop_schema {
            sqlx::Executor::execute(
                &mut *tx,
                format!("DROP SCHEMA IF EXISTS {id} CASCADE").as_str(),
            )
            .await?;
        }
        if drop_role {
            // DROP OWNED also removes the role's grants in this database; objects elsewhere
            // make DROP ROLE fail, which is reported rather than forced.
            sqlx::Executor::execute(
                &mut *tx,
                format!("DROP OWNED BY {id} CASCADE; DROP ROLE IF EXISTS {id}").as_str(),
            )
            .await?;
        }
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
