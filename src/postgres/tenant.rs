//! A tenant's footprint in PostgreSQL, in the owner/app layout: an **owner** role (NOLOGIN)
//! owns the schema and every object in it and runs the migrations; an **app** role (LOGIN, the
//! credentials in the Secret) may only use the data — USAGE on the schema, DML on its tables,
//! its sequences and functions through default privileges — and create nothing. The API
//! gateway is a member of app roles only.
//!
//! Whose code runs here: every statement below runs in an admin session (the session user may
//! act for every tenant). None of them evaluates an object a tenant could have created: DDL and
//! catalog reads only, the history table is checked to be an ordinary table without triggers,
//! rules or row security before it is read (`migrations::applied`), and the admin connection's
//! `search_path` is `pg_catalog` alone (see [`super::connect_options`]).

use sqlx::Connection;

use super::{
    mark,
    migrations::{MigrateError, MigrationSet},
    Admin, Error,
};
use crate::domain::{
    naming::{quote_literal, Ident},
    scram,
    state::{Layout, LoginSettings, Observed, Owner, RoleState, SchemaState},
};

/// The identifiers of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The schema, and the app role (same name, so Secrets issued before the owner/app split
    /// keep working).
    pub schema: Ident,
    pub owner: Ident,
    /// The second login identity, which credential rotation alternates with the app role: a
    /// member of the app role (so it has exactly its rights), with nothing of its own.
    pub login_b: Ident,
}

impl Names {
    pub fn new(schema: Ident) -> Self {
        let owner = crate::domain::naming::owner_role(&schema);
        let login_b = crate::domain::naming::login_b(&schema);
        Self {
            schema,
            owner,
            login_b,
        }
    }

    /// The login identity named `name`, if it is one of this tenant's two.
    pub fn identity(&self, name: &str) -> Option<&Ident> {
        [self.app(), &self.login_b]
            .into_iter()
            .find(|i| i.as_str() == name)
    }

    /// The app role: the login in the credentials Secret.
    pub fn app(&self) -> &Ident {
        &self.schema
    }
}

/// What was done to bring the schema into the owner/app layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    Created,
    /// Converted from the layout where the app role owned the schema. Lists the functions,
    /// triggers, views, rules and policies found in it, which a tenant credential may have
    /// planted and which now run with the owner's rights.
    Converted {
        untrusted: Vec<String>,
        /// How the schema compared with what its migrations create.
        review: Review,
    },
    /// Not converted: a schema of the old layout that holds more than its migrations create
    /// (or whose history cannot be read), waiting for an administrator's review.
    HeldForReview(Review),
    Repaired,
    Unchanged,
}

/// Which login identities may log in after [`Admin::ensure_roles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logins<'a> {
    /// LOGIN for the app role (identity A); NOLOGIN when false.
    pub app: bool,
    /// LOGIN for the second identity, when it exists.
    pub b: bool,
    /// The identity retired now: NOLOGIN, and its password removed.
    pub retire: Option<&'a Ident>,
}

impl Admin {
    /// Reads the state of the tenant's roles (owner, app, second login identity) and its
    /// schema, in one round trip of catalog reads (no tenant object is evaluated).
    pub async fn observe_tenant(&self, names: &Names) -> Result<Observed, sqlx::Error> {
        use sqlx::Row;
        let verifier = |alias: &str| {
            if self.superuser {
                format!(
                    "(SELECT a.rolpassword FROM pg_catalog.pg_authid a WHERE a.oid = {alias}.oid)"
                )
            } else {
                "NULL::text".to_string()
            }
        };
        let role_cols = |alias: &str| {
            format!(
                "{alias}.oid IS NOT NULL, {alias}.rolcanlogin, \
                 EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
                         JOIN pg_catalog.pg_roles g ON g.oid = m.member \
                         WHERE m.roleid = {alias}.oid AND g.rolname = $3), \
                 pg_catalog.shobj_description({alias}.oid, 'pg_authid'), {}, {alias}.rolconnlimit, \
                 EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
                         WHERE m.roleid = r.oid AND m.member = {alias}.oid), \
                 (SELECT pg_catalog.substr(c, 19) \
                    FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) c \
                   WHERE s.setrole = {alias}.oid AND s.setdatabase = 0 \
                     AND pg_catalog.starts_with(c, 'statement_timeout=') LIMIT 1)",
                verifier(alias)
            )
        };
        let row = sqlx::query(&format!(
            "SELECT {app}, {own}, {b}, \
                    n.oid IS NOT NULL, pg_catalog.pg_get_userbyid(n.nspowner), \
                    pg_catalog.obj_description(n.oid, 'pg_namespace'), \
                    CASE WHEN n.oid IS NOT NULL AND r.oid IS NOT NULL \
                         THEN pg_catalog.has_schema_privilege(r.oid, n.oid, 'CREATE') END, \
                    CASE WHEN n.oid IS NOT NULL AND r.oid IS NOT NULL \
                         THEN pg_catalog.has_schema_privilege(r.oid, n.oid, 'USAGE') END \
             FROM (SELECT $1::name AS app, $2::name AS own, $4::name AS b) x \
             LEFT JOIN pg_catalog.pg_roles r ON r.rolname = x.app \
             LEFT JOIN pg_catalog.pg_roles o ON o.rolname = x.own \
             LEFT JOIN pg_catalog.pg_roles l ON l.rolname = x.b \
             LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = x.app",
            app = role_cols("r"),
            own = role_cols("o"),
            b = role_cols("l"),
        ))
        .bind(names.app().as_str())
        .bind(names.owner.as_str())
        .bind(self.gateway.as_ref().map(|g| g.as_str().to_string()))
        .bind(names.login_b.as_str())
        .fetch_one(&self.pool)
        .await?;
        // Eight columns per role, then the schema's.
        let role = |at: usize| -> Result<Option<RoleState>, sqlx::Error> {
            let exists: bool = row.try_get(at)?;
            let comment: Option<String> = row.try_get(at + 3)?;
            Ok(exists.then(|| RoleState {
                can_login: row
                    .try_get::<Option<bool>, _>(at + 1)
                    .ok()
                    .flatten()
                    .unwrap_or(false),
                gateway_member: row.try_get(at + 2).unwrap_or(false),
                owner: Owner::parse(comment.as_deref()),
                verifier: row.try_get(at + 4).ok().flatten(),
                connection_limit: row
                    .try_get::<Option<i32>, _>(at + 5)
                    .ok()
                    .flatten()
                    .unwrap_or(-1),
                member_of_app: row.try_get(at + 6).unwrap_or(false),
                statement_timeout: row.try_get(at + 7).ok().flatten(),
            }))
        };
        let mut owner_role = role(8)?;
        if let Some(o) = &mut owner_role {
            o.verifier = None;
        }
        let schema_exists: bool = row.try_get(24)?;
        let schema = if schema_exists {
            let owner_role_name: Option<String> = row.try_get(25)?;
            let comment: Option<String> = row.try_get(26)?;
            let create: Option<bool> = row.try_get(27)?;
            let usage: Option<bool> = row.try_get(28)?;
            Some(SchemaState {
                owner_role: owner_role_name.unwrap_or_default(),
                owner: Owner::parse(comment.as_deref()),
                app_can_create: create.unwrap_or(false),
                app_usage: usage.unwrap_or(false),
            })
        } else {
            None
        };
        Ok(Observed {
            role: role(0)?,
            owner_role,
            login_b: role(16)?,
            schema,
        })
    }

    /// The settings of the tenant's login roles: `connections` (`spec.limits.connections`)
    /// overrides the operator's `--tenant-connection-limit`.
    pub fn login_settings(
        &self,
        connections: Option<i32>,
        statement_timeout_ms: Option<u64>,
    ) -> LoginSettings {
        LoginSettings {
            connection_limit: connections.unwrap_or(self.connection_limit),
            statement_timeout_ms,
        }
    }

    /// Creates whichever of the owner and app roles is missing and brings the existing roles
    /// back in line (marks, LOGIN as `logins` says, connection limits, gateway membership of
    /// the app role only, the second identity a member of the app role), in one transaction.
    /// `password` is the app role's password when it is created now. Returns whether
    /// anything changed.
    pub async fn ensure_roles(
        &self,
        names: &Names,
        owner_mark: &Owner,
        observed: &Observed,
        password: Option<&str>,
        logins: &Logins<'_>,
        settings: &LoginSettings,
    ) -> Result<bool, Error> {
        let login = logins.app;
        let comment = mark(owner_mark)?;
        let (app, own) = (names.app(), &names.owner);
        let mut stmts = Vec::new();
        match &observed.owner_role {
            None => {
                stmts.push(format!(
                    "CREATE ROLE {own} NOLOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE \
                     NOREPLICATION NOBYPASSRLS"
                ));
                stmts.push(format!("COMMENT ON ROLE {own} IS {comment}"));
                if !self.superuser {
                    // A non-superuser admin needs membership to create the schema for the
                    // owner, set its default privileges and run migrations as it.
                    stmts.push(format!("GRANT {own} TO CURRENT_USER"));
                }
            }
            Some(state) => {
                if state.can_login {
                    stmts.push(format!("ALTER ROLE {own} NOLOGIN"));
                }
                if state.owner.as_ref() != Some(owner_mark) {
                    stmts.push(format!("COMMENT ON ROLE {own} IS {comment}"));
                }
                if let (Some(gw), true) = (&self.gateway, state.gateway_member) {
                    // The gateway may act as app roles only.
                    stmts.push(format!("REVOKE {own} FROM {gw}"));
                }
            }
        }
        match &observed.role {
            None => {
                let password = password.expect("a password for a new app role");
                let verifier =
                    quote_literal(&scram::verifier(password)).expect("verifier is base64");
                let limit = settings.connection_limit;
                let login = if login { "LOGIN" } else { "NOLOGIN" };
                stmts.push(format!(
                    "CREATE ROLE {app} {login} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                     NOBYPASSRLS INHERIT CONNECTION LIMIT {limit} PASSWORD {verifier}"
                ));
                stmts.push(format!("COMMENT ON ROLE {app} IS {comment}"));
                stmts.push(format!("ALTER ROLE {app} SET search_path TO {app}"));
                stmts.extend(login_settings_sql(&[(app, None)], settings));
                if !self.superuser {
                    stmts.push(format!("GRANT {app} TO CURRENT_USER"));
                }
                if let Some(gw) = &self.gateway {
                    stmts.push(format!("GRANT {app} TO {gw}"));
                }
            }
            Some(state) => {
                if state.can_login != login {
                    let login = if login { "LOGIN" } else { "NOLOGIN" };
                    stmts.push(format!("ALTER ROLE {app} {login}"));
                }
                stmts.extend(login_settings_sql(&[(app, Some(state))], settings));
                if state.owner.as_ref() != Some(owner_mark) {
                    stmts.push(format!("COMMENT ON ROLE {app} IS {comment}"));
                }
                if let (Some(gw), false) = (&self.gateway, state.gateway_member) {
                    stmts.push(format!("GRANT {app} TO {gw}"));
                }
            }
        }
        if let Some(state) = &observed.login_b {
            let b = &names.login_b;
            if state.can_login != logins.b {
                let login = if logins.b { "LOGIN" } else { "NOLOGIN" };
                stmts.push(format!("ALTER ROLE {b} {login}"));
            }
            stmts.extend(login_settings_sql(&[(b, Some(state))], settings));
            if state.owner.as_ref() != Some(owner_mark) {
                stmts.push(format!("COMMENT ON ROLE {b} IS {comment}"));
            }
            if let (Some(gw), true) = (&self.gateway, state.gateway_member) {
                // The gateway acts as app roles only, never as a login identity.
                stmts.push(format!("REVOKE {b} FROM {gw}"));
            }
            // The app role exists by now (created above when it was missing: dropped out of
            // band, which took this membership with it).
            if !state.member_of_app {
                stmts.push(format!("GRANT {app} TO {b}"));
            }
        }
        if let Some(retired) = logins.retire {
            // Its password goes too: nothing but a rotation makes it a login again.
            stmts.push(retire_sql(retired));
        }
        if stmts.is_empty() {
            return Ok(false);
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(&mut *tx, stmts.join(";\n").as_str()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Makes `target` (the app role or the second identity) a login with `password`: the
    /// rotation's first step, before the Secret is written. The second identity is created when
    /// missing: LOGIN, INHERIT, a member of the app role and nothing else, the app role's
    /// connection limit and `search_path`, this Tenant's mark; never a role the gateway may
    /// switch to. One transaction.
    pub async fn rotate_to(
        &self,
        names: &Names,
        owner_mark: &Owner,
        observed: &Observed,
        target: &Ident,
        password: &str,
        settings: &LoginSettings,
    ) -> Result<(), Error> {
        let comment = mark(owner_mark)?;
        let verifier = quote_literal(&scram::verifier(password)).expect("verifier is base64");
        let (app, schema) = (names.app(), &names.schema);
        let mut stmts = Vec::new();
        if target == &names.login_b && observed.login_b.is_none() {
            let limit = settings.connection_limit;
            stmts.push(format!(
                "CREATE ROLE {target} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                 NOBYPASSRLS INHERIT CONNECTION LIMIT {limit} PASSWORD {verifier}"
            ));
            stmts.push(format!("COMMENT ON ROLE {target} IS {comment}"));
            stmts.push(format!("ALTER ROLE {target} SET search_path TO {schema}"));
            stmts.extend(login_settings_sql(&[(target, None)], settings));
            stmts.push(format!("GRANT {app} TO {target}"));
            if !self.superuser {
                // To end its sessions and drop it later (see `terminate`).
                stmts.push(format!("GRANT {target} TO CURRENT_USER"));
            }
        } else {
            stmts.push(format!("ALTER ROLE {target} LOGIN PASSWORD {verifier}"));
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(&mut *tx, stmts.join(";\n").as_str()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes INSERT and UPDATE on every table (and view) of the schema from the tenant's login
    /// roles (`allowed` false: over its storage quota), or gives them back; SELECT and DELETE
    /// stay, and so do sequences (a `nextval` stores nothing). Giving back keeps the migration
    /// history the operator's (see [`revoke_history`]). One transaction.
    pub async fn set_writes(
        &self,
        names: &Names,
        logins: &[&Ident],
        allowed: bool,
    ) -> Result<(), sqlx::Error> {
        let schema = &names.schema;
        let mut stmts = Vec::new();
        for login in logins {
            stmts.push(if allowed {
                format!("GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {login}")
            } else {
                format!("REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} FROM {login}")
            });
        }
        if allowed {
            stmts.push(revoke_history(names));
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(&mut *tx, stmts.join(";\n").as_str()).await?;
        tx.commit().await
    }

    /// Whether any of `logins` may INSERT into or UPDATE some table or view of the schema: a
    /// table a migration created while the tenant was over quota (default privileges granted
    /// it), or a grant made by hand. Catalog reads only.
    pub async fn writes_granted(
        &self,
        names: &Names,
        logins: &[&Ident],
    ) -> Result<bool, sqlx::Error> {
        let logins: Vec<&str> = logins.iter().map(|l| l.as_str()).collect();
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
                pg_catalog.unnest($2::pg_catalog.text[]) r(name) \
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'f') \
                AND (pg_catalog.has_table_privilege(r.name, c.oid, 'INSERT') \
                     OR pg_catalog.has_table_privilege(r.name, c.oid, 'UPDATE')))",
        )
        .bind(names.schema.as_str())
        .bind(logins)
        .fetch_one(&self.pool)
        .await
    }

    /// Bytes used by each of `schemas` (tables and materialized views with their indexes and
    /// TOAST), for the whole fleet at once: one statement per [`USAGE_CHUNK`] schemas, each in
    /// its own short transaction.
    ///
    /// Whose code runs here: an admin session evaluating catalog functions only
    /// (`pg_total_relation_size` reads file sizes; no tenant object is evaluated). That
    /// function takes an ACCESS SHARE lock on each relation it sizes (and lets it go at once),
    /// so it waits behind a tenant holding ACCESS EXCLUSIVE on its own table; that wait is
    /// bounded by [`USAGE_LOCK_TIMEOUT_MS`], and a statement that gives up loses only its
    /// chunk, which is then measured again schema by schema: only that tenant goes
    /// unmeasured this time.
    pub async fn measure_usage(
        &self,
        schemas: &[String],
    ) -> Result<std::collections::BTreeMap<String, u64>, sqlx::Error> {
        let mut out = std::collections::BTreeMap::new();
        for chunk in schemas.chunks(USAGE_CHUNK) {
            match self.usage_of(chunk).await {
                Ok(rows) => out.extend(rows),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    for schema in chunk {
                        match self.usage_of(std::slice::from_ref(schema)).await {
                            Ok(rows) => out.extend(rows),
                            Err(e) => {
                                tracing::warn!(schema = %schema, error = %e, "storage usage not measured this time")
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn usage_of(&self, schemas: &[String]) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(
            &mut *tx,
            format!("SET LOCAL lock_timeout = {USAGE_LOCK_TIMEOUT_MS}").as_str(),
        )
        .await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(USAGE)
            .bind(schemas)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(s, b)| (s, b.max(0) as u64))
            .collect())
    }

    /// A previous login whose grace period is over, while the Tenant's spec is refused:
    /// NOLOGIN and no password (what the role step does otherwise). DDL on a validated,
    /// quoted identifier; end its sessions with [`Admin::terminate`] afterwards.
    pub async fn retire_login(&self, login: &Ident) -> Result<(), sqlx::Error> {
        sqlx::Executor::execute(&self.pool, retire_sql(login).as_str())
            .await
            .map(drop)
    }

    /// Functions, triggers, views, materialized views, rules and policies in the schema, as
    /// "kind name" strings: what a tenant credential could have planted before the owner/app
    /// split. Catalog reads only.
    pub async fn untrusted_objects(&self, schema: &Ident) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT kind || ' ' || name FROM (
               SELECT 'function' AS kind, p.oid::regprocedure::text AS name
                 FROM pg_catalog.pg_proc p WHERE p.pronamespace = $1::regnamespace
               UNION ALL
               SELECT 'trigger', t.tgname || ' on ' || c.relname
                 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
                WHERE c.relnamespace = $1::regnamespace AND NOT t.tgisinternal
               UNION ALL
               SELECT CASE c.relkind WHEN 'v' THEN 'view' ELSE 'materialized view' END, c.relname
                 FROM pg_catalog.pg_class c
                WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('v', 'm')
               UNION ALL
               SELECT 'rule', r.rulename || ' on ' || c.relname
                 FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                WHERE c.relnamespace = $1::regnamespace AND r.rulename <> '_RETURN'
               UNION ALL
               SELECT 'policy', p.polname || ' on ' || c.relname
                 FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
                WHERE c.relnamespace = $1::regnamespace
             ) o ORDER BY 1",
        )
        .bind(schema.as_str())
        .fetch_all(&self.pool)
        .await
    }

    /// Brings the schema into the owner/app layout: creates it, converts a schema owned by the
    /// app role (ownership of the schema and every object in it moves to the owner role, the
    /// app role keeps DML only), or repairs drifted ownership and rights. One transaction.
    ///
    /// A schema of the old layout is converted only when it holds exactly what its applied
    /// migrations create ([`Admin::review_legacy`]), or when `reviewed` (an administrator
    /// looked at it); otherwise nothing changes and [`SchemaChange::HeldForReview`] says why.
    ///
    /// `app_recreated`: the app role was created again in this reconcile (dropped out of band,
    /// which took its rights with it): its rights on what the schema already holds are granted
    /// again, as the owner's default privileges gave them.
    pub async fn ensure_schema(
        &self,
        names: &Names,
        owner_mark: &Owner,
        observed: &Observed,
        set: &MigrationSet,
        reviewed: bool,
        app_recreated: bool,
    ) -> Result<SchemaChange, Error> {
        let comment = mark(owner_mark)?;
        let (schema, app, own) = (&names.schema, names.app(), &names.owner);
        let layout = observed.layout(own.as_str(), app.as_str());
        let mark_stale = observed
            .schema
            .as_ref()
            .is_some_and(|s| s.owner.as_ref() != Some(owner_mark));
        let mut stmts = Vec::new();
        let mut untrusted = Vec::new();
        let mut review = Review::Clean;
        match layout {
            Layout::Missing => {
                stmts.push(format!("CREATE SCHEMA {schema} AUTHORIZATION {own}"));
                stmts.push(format!("COMMENT ON SCHEMA {schema} IS {comment}"));
                stmts.extend(privileges(names));
            }
            Layout::Legacy => {
                review = self.review_legacy(names, set).await?;
                if review != Review::Clean && !reviewed {
                    return Ok(SchemaChange::HeldForReview(review));
                }
                untrusted = self.untrusted_objects(schema).await?;
                // Everything the app role owns in this database is the tenant's schema and its
                // objects (it could create nowhere else).
                stmts.push(format!("REASSIGN OWNED BY {app} TO {own}"));
                stmts.push(format!("ALTER SCHEMA {schema} OWNER TO {own}"));
                stmts.extend(privileges(names));
                stmts.extend(existing_grants(names));
                stmts.push(revoke_history(names));
            }
            Layout::Drifted => {
                stmts.push(format!("ALTER SCHEMA {schema} OWNER TO {own}"));
                stmts.extend(privileges(names));
            }
            Layout::Current => {}
        }
        if app_recreated && matches!(layout, Layout::Drifted | Layout::Current) {
            stmts.extend(existing_grants(names));
            stmts.push(revoke_history(names));
        }
        if mark_stale && layout != Layout::Missing {
            stmts.push(format!("COMMENT ON SCHEMA {schema} IS {comment}"));
        }
        if stmts.is_empty() {
            return Ok(SchemaChange::Unchanged);
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(&mut *tx, stmts.join(";\n").as_str()).await?;
        tx.commit().await?;
        Ok(match layout {
            Layout::Missing => SchemaChange::Created,
            Layout::Legacy => SchemaChange::Converted { untrusted, review },
            _ => SchemaChange::Repaired,
        })
    }

    /// `Retain` deletion: schema, data and roles stay; the app role can no longer log in, the
    /// gateway can no longer act as it, and its open sessions end.
    /// The second login identity (when `drop_b`: it carries this Tenant's mark) is dropped;
    /// anything it owns goes to the app role.
    pub async fn retain_tenant(&self, names: &Names, drop_b: bool) -> Result<(), sqlx::Error> {
        let app = names.app();
        let mut sql = format!("ALTER ROLE {app} NOLOGIN");
        if let Some(gw) = &self.gateway {
            sql.push_str(&format!(";\nREVOKE {app} FROM {gw}"));
        }
        sqlx::Executor::execute(&self.pool, sql.as_str()).await?;
        self.terminate(app).await?;
        if drop_b {
            let b = &names.login_b;
            self.end_identity(b).await?;
            let mut conn = self.pool.acquire().await?;
            let mut tx = conn.begin().await?;
            sqlx::Executor::execute(
                &mut *tx,
                format!(
                    "REASSIGN OWNED BY {b} TO {app}; DROP OWNED BY {b}; DROP ROLE IF EXISTS {b}"
                )
                .as_str(),
            )
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// NOLOGIN for a login identity about to be dropped, then its sessions ended.
    async fn end_identity(&self, id: &Ident) -> Result<(), sqlx::Error> {
        sqlx::Executor::execute(&self.pool, format!("ALTER ROLE {id} NOLOGIN").as_str()).await?;
        self.terminate(id).await.map(drop)
    }

    /// Ends every session logged in as `role` (in any database), but never this one; returns
    /// how many were ended. Call it after the role lost LOGIN, so none comes back.
    ///
    /// Whose code runs here: an admin session, evaluating catalog functions only
    /// (`pg_catalog`-qualified, the role name bound, not spliced). Only the role's own
    /// sessions are signalled; a CREATEROLE-only admin may do that because it is a member of
    /// every app role it created (`GRANT .. TO CURRENT_USER` in [`Admin::ensure_roles`]), and
    /// a session it may not signal is an error reported to the caller, not skipped.
    pub async fn terminate(&self, role: &Ident) -> Result<u64, sqlx::Error> {
        let ended: i64 = sqlx::query_scalar(
            "SELECT pg_catalog.count(*) FILTER (WHERE pg_catalog.pg_terminate_backend(a.pid)) \
             FROM pg_catalog.pg_stat_activity a \
             WHERE a.usename OPERATOR(pg_catalog.=) $1::pg_catalog.name \
               AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
        )
        .bind(role.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(ended.max(0) as u64)
    }

    /// `Delete` deletion: ends the login identities' sessions, drops the schema with
    /// everything in it (only when `drop_schema`: it carries this Tenant's mark) and the roles
    /// marked as this Tenant's (`drop.app`, `drop.owner`, `drop.login_b`).
    pub async fn drop_tenant_roles(
        &self,
        names: &Names,
        drop_schema: bool,
        drop: RolesToDrop,
    ) -> Result<(), sqlx::Error> {
        let (schema, app, own, b) = (&names.schema, names.app(), &names.owner, &names.login_b);
        if drop.app {
            self.end_identity(app).await?;
        }
        if drop.login_b {
            self.end_identity(b).await?;
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let mut stmts = Vec::new();
        if drop_schema {
            stmts.push(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
        // DROP OWNED also removes the role's grants in this database; objects elsewhere make
        // DROP ROLE fail, which is reported rather than forced.
        if drop.login_b {
            stmts.push(format!("DROP OWNED BY {b} CASCADE"));
            stmts.push(format!("DROP ROLE IF EXISTS {b}"));
        }
        if drop.app {
            stmts.push(format!("DROP OWNED BY {app} CASCADE"));
            stmts.push(format!("DROP ROLE IF EXISTS {app}"));
        }
        if drop.owner {
            stmts.push(format!("DROP OWNED BY {own} CASCADE"));
            stmts.push(format!("DROP ROLE IF EXISTS {own}"));
        }
        if !stmts.is_empty() {
            sqlx::Executor::execute(&mut *tx, stmts.join(";\n").as_str()).await?;
        }
        tx.commit().await
    }
}

/// Which of a tenant's roles [`Admin::drop_tenant_roles`] drops: those marked as the
/// Tenant's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RolesToDrop {
    pub app: bool,
    pub owner: bool,
    pub login_b: bool,
}

/// Schemas sized by one statement of [`Admin::measure_usage`].
pub const USAGE_CHUNK: usize = 100;
/// How long the usage measurement waits for a relation's lock, in milliseconds.
pub const USAGE_LOCK_TIMEOUT_MS: u64 = 1000;

/// The fleet's storage usage: bytes of the tables and materialized views of each schema named
/// in `$1`, with their indexes and TOAST (`pg_total_relation_size`); partitions are tables of
/// their own, so a partitioned parent (size 0) is not counted twice. Schemas without a
/// relation count 0.
pub const USAGE: &str = "SELECT n.nspname::pg_catalog.text, \
        COALESCE(pg_catalog.sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::pg_catalog.int8 \
   FROM pg_catalog.pg_namespace n \
   LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'm') \
  WHERE n.nspname = ANY ($1::pg_catalog.name[]) \
  GROUP BY n.nspname";

/// The statements that bring each of a tenant's login roles (with what was observed of it,
/// `None` for a role created in the same transaction) to `settings`: its `CONNECTION LIMIT`
/// and its default `statement_timeout`, set or reset. Nothing for a role already there.
///
/// PostgreSQL counts connections per role, so with several login roles each gets the whole
/// limit (a group role's limit does not bind its members' logins). A role's default
/// `statement_timeout` is only a default: any session may set its own.
pub fn login_settings_sql(
    logins: &[(&Ident, Option<&RoleState>)],
    settings: &LoginSettings,
) -> Vec<String> {
    let mut stmts = Vec::new();
    let timeout = settings.statement_timeout_ms.map(|ms| ms.to_string());
    for (role, observed) in logins {
        if let Some(state) = observed {
            if state.connection_limit != settings.connection_limit {
                stmts.push(format!(
                    "ALTER ROLE {role} CONNECTION LIMIT {}",
                    settings.connection_limit
                ));
            }
        }
        let current = observed.and_then(|s| s.statement_timeout.as_deref());
        match (&timeout, current) {
            (Some(want), Some(have)) if want == have => {}
            (Some(want), _) => stmts.push(format!(
                "ALTER ROLE {role} SET statement_timeout = {}",
                quote_literal(want).expect("digits quote")
            )),
            (None, Some(_)) => stmts.push(format!("ALTER ROLE {role} RESET statement_timeout")),
            (None, None) => {}
        }
    }
    stmts
}

/// Retires a login whose grace period is over: no LOGIN and no password, so that nothing but
/// a rotation makes it a login again.
fn retire_sql(login: &Ident) -> String {
    format!("ALTER ROLE {login} NOLOGIN PASSWORD NULL")
}

/// The app role's rights in the owner/app layout: it may use the schema and, through default
/// privileges of the owner, read and write every table, use every sequence and call every
/// function the migrations create; it may create nothing.
fn privileges(names: &Names) -> Vec<String> {
    let (schema, app, own) = (&names.schema, names.app(), &names.owner);
    vec![
        format!("REVOKE ALL ON SCHEMA {schema} FROM PUBLIC"),
        format!("REVOKE ALL ON SCHEMA {schema} FROM {app}"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {app}"),
        format!(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {own} IN SCHEMA {schema} \
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}"
        ),
        format!(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {own} IN SCHEMA {schema} \
             GRANT USAGE, SELECT ON SEQUENCES TO {app}"
        ),
        format!(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {own} IN SCHEMA {schema} \
             GRANT EXECUTE ON FUNCTIONS TO {app}"
        ),
    ]
}

/// The app role's rights on what the schema already holds: what the owner's default
/// privileges ([`privileges`]) give it on what the migrations create. Revoke the history table
/// afterwards ([`revoke_history`]).
fn existing_grants(names: &Names) -> Vec<String> {
    let (schema, app) = (&names.schema, names.app());
    vec![
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {app}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {app}"),
        format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {app}"),
    ]
}

/// The history table is the operator's: the app role gets no rights on it (default privileges
/// would give it DML). A no-op when the table does not exist.
pub(super) fn revoke_history(names: &Names) -> String {
    let (schema, app) = (&names.schema, names.app());
    let table = super::migrations::HISTORY_TABLE;
    format!(
        "DO $tenantry$ BEGIN \
           IF pg_catalog.to_regclass({}) IS NOT NULL THEN \
             EXECUTE {}; \
           END IF; \
         END $tenantry$",
        quote_literal(&format!("{schema}.{table}")).expect("identifiers quote"),
        quote_literal(&format!("REVOKE ALL ON TABLE {schema}.{table} FROM {app}"))
            .expect("identifiers quote"),
    )
}

/// Deparsed definitions of everything in a schema that can evaluate code or change what a
/// statement means: columns with their defaults and generation, constraints (tables and
/// domains), indexes, triggers, functions and aggregates, views, rules, policies, types, enum
/// labels, operators, casts, inheritance and row-security switches. `$1` is the schema name.
/// Catalog reads and deparsing only (the admin session's `search_path` is `pg_catalog`, so the
/// schema's own names come out qualified and are normalised by the caller).
const FINGERPRINT: &str = "
WITH s AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' rls=' || c.relrowsecurity::text
       || c.relforcerowsecurity::text || ' ' || COALESCE(c.reloptions::text, '')
  FROM pg_catalog.pg_class c, s WHERE c.relnamespace = s.oid AND c.relkind NOT IN ('i', 'I', 't')
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
       || ' notnull=' || a.attnotnull::text || ' gen=' || a.attgenerated::text
       || ' id=' || a.attidentity::text || ' default=' ||
       COALESCE(pg_catalog.pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE c.relkind NOT IN ('i', 'I', 't', 'S')
UNION ALL
SELECT 'constraint ' || COALESCE(c.relname, t.typname) || ' ' || k.conname || ' '
       || pg_catalog.pg_get_constraintdef(k.oid)
  FROM pg_catalog.pg_constraint k JOIN s ON k.connamespace = s.oid
  LEFT JOIN pg_catalog.pg_class c ON c.oid = k.conrelid
  LEFT JOIN pg_catalog.pg_type t ON t.oid = k.contypid
UNION ALL
SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
  FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid JOIN s ON c.relnamespace = s.oid
UNION ALL
SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(g.oid)
  FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid JOIN s ON c.relnamespace = s.oid
 WHERE NOT g.tgisinternal
UNION ALL
SELECT CASE WHEN p.prokind = 'a' THEN 'aggregate ' || p.oid::pg_catalog.regprocedure::text
            ELSE 'function ' || pg_catalog.pg_get_functiondef(p.oid) END
  FROM pg_catalog.pg_proc p JOIN s ON p.pronamespace = s.oid
UNION ALL
SELECT 'view ' || c.relname || ' ' || pg_catalog.pg_get_viewdef(c.oid)
  FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid WHERE c.relkind IN ('v', 'm')
UNION ALL
SELECT 'rule ' || pg_catalog.pg_get_ruledef(r.oid)
  FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class JOIN s ON c.relnamespace = s.oid
 WHERE r.rulename <> '_RETURN'
UNION ALL
SELECT 'policy ' || c.relname || ' ' || p.polname || ' ' || p.polcmd::text || ' ' || p.polpermissive::text
       || ' ' || COALESCE(pg_catalog.pg_get_expr(p.polqual, p.polrelid), '')
       || ' ' || COALESCE(pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid), '')
  FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid JOIN s ON c.relnamespace = s.oid
UNION ALL
SELECT 'type ' || t.typname || ' ' || t.typtype::text || ' ' || pg_catalog.format_type(t.typbasetype, t.typtypmod)
  FROM pg_catalog.pg_type t JOIN s ON t.typnamespace = s.oid
 WHERE t.typrelid = 0 AND t.typcategory <> 'A'
UNION ALL
SELECT 'enum ' || t.typname || ' ' || e.enumlabel
  FROM pg_catalog.pg_enum e JOIN pg_catalog.pg_type t ON t.oid = e.enumtypid JOIN s ON t.typnamespace = s.oid
UNION ALL
SELECT 'operator ' || o.oid::pg_catalog.regoperator::text || ' ' || o.oprcode::pg_catalog.regproc::text
  FROM pg_catalog.pg_operator o JOIN s ON o.oprnamespace = s.oid
UNION ALL
SELECT 'cast ' || k.castsource::pg_catalog.regtype::text || ' ' || k.casttarget::pg_catalog.regtype::text
       || ' ' || k.castfunc::pg_catalog.regprocedure::text
  FROM pg_catalog.pg_cast k, s
 WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace = s.oid
                AND t.oid IN (k.castsource, k.casttarget))
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = s.oid AND p.oid = k.castfunc)
UNION ALL
SELECT 'inherits ' || h.inhrelid::pg_catalog.regclass::text || ' ' || h.inhparent::pg_catalog.regclass::text
  FROM pg_catalog.pg_inherits h JOIN pg_catalog.pg_class c ON c.oid = h.inhrelid JOIN s ON c.relnamespace = s.oid
";

/// The fingerprint of `schema` with its own name taken out, sorted.
async fn fingerprint(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<Option<String>> = sqlx::query_scalar(FINGERPRINT)
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
    let qualified = format!("{schema}.");
    let quoted = format!("\"{schema}\".");
    let mut out: Vec<String> = rows
        .into_iter()
        .flatten()
        .map(|r| r.replace(&quoted, "").replace(&qualified, ""))
        .collect();
    out.sort();
    Ok(out)
}

/// What a schema of the layout before the owner/app split holds beyond what the migration set
/// creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    /// The schema's definitions are exactly those the applied migrations create.
    Clean,
    /// Definitions the migration set does not create (or creates differently): they may have
    /// been planted with the tenant's credentials.
    Unexpected(Vec<String>),
    /// The history table cannot be read safely, so the applied migrations are unknown.
    Unreadable(String),
}

impl Admin {
    /// Compares the schema of a tenant of the old layout with a reference schema built, in a
    /// transaction that is rolled back, by the migrations its history records. Only trusted
    /// code runs: the platform's migrations, in a throwaway schema.
    pub async fn review_legacy(&self, names: &Names, set: &MigrationSet) -> Result<Review, Error> {
        let mut conn = self.pool.acquire().await?;
        // The history of the old layout is owned by the app role: same checks, that owner.
        let legacy = Names {
            schema: names.schema.clone(),
            owner: names.schema.clone(),
            login_b: names.login_b.clone(),
        };
        let applied = match super::migrations::applied(&mut conn, &legacy).await {
            Ok(a) => a,
            Err(MigrateError::UntrustedHistory { message }) => {
                return Ok(Review::Unreadable(message))
            }
            Err(MigrateError::Database(e)) => return Err(e.into()),
            Err(e) => return Ok(Review::Unreadable(e.to_string())),
        };
        let pending = match set.pending(&applied) {
            Ok(p) => p,
            Err(e) => return Ok(Review::Unreadable(e.to_string())),
        };
        let theirs = fingerprint(&mut conn, names.schema.as_str()).await?;
        let reference = format!(
            "tenantry_ref_{}",
            crate::domain::scram::generate_password().to_ascii_lowercase()
        );
        let reference_id = Ident::parse("schema", &reference[..reference.len().min(63)])
            .expect("a valid identifier");
        let mut tx = conn.begin().await?;
        sqlx::Executor::execute(
            &mut *tx,
            format!(
                "CREATE SCHEMA {reference_id}; SET LOCAL search_path TO {reference_id}; \
                 SET LOCAL statement_timeout = {}",
                self.timeouts.migration_ms
            )
            .as_str(),
        )
        .await?;
        sqlx::Executor::execute(
            &mut *tx,
            super::migrations::history_ddl(&reference_id).as_str(),
        )
        .await?;
        for m in set.migrations() {
            if pending.iter().any(|p| p.version == m.version) {
                continue;
            }
            // A file of CONCURRENTLY statements runs here without the keyword: the reference
            // schema's tables are new and nobody else's, inside this transaction.
            let sql = super::lint::sql_in_transaction(&m.sql);
            sqlx::Executor::execute(&mut *tx, sql.as_ref()).await?;
        }
        sqlx::Executor::execute(&mut *tx, "SET LOCAL search_path TO pg_catalog").await?;
        let ours = fingerprint(&mut tx, reference_id.as_str()).await?;
        tx.rollback().await?;
        let unexpected: Vec<String> = theirs
            .iter()
            .filter(|t| ours.binary_search(t).is_err())
            .cloned()
            .collect();
        Ok(if unexpected.is_empty() {
            Review::Clean
        } else {
            Review::Unexpected(unexpected)
        })
    }
}
