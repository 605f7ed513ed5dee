//! Tenant migration sets: loading them (the embedded default set or a mounted directory) and
//! applying them inside one tenant schema, as the tenant role, under a per-schema lock.
//!
//! sqlx's migrator takes one advisory lock per database, which would serialise every tenant;
//! here each tenant schema has its own lock and its own `tenantry_migrations` table.

use std::path::Path;

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};

use super::tenant::Names;

/// Name of the table, inside each tenant schema, recording applied migrations.
pub const HISTORY_TABLE: &str = "tenantry_migrations";

/// A migration recorded in a schema: version and checksum.
pub type Applied = (i64, Vec<u8>);

/// One migration: `<version>_<description>.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub description: String,
    pub sql: String,
    pub checksum: Vec<u8>,
}

/// An ordered set of migrations with unique, positive versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationSet {
    migrations: Vec<Migration>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read migrations from {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("migration file {0:?} is not named <version>_<description>.sql with a positive integer version")]
    BadName(String),
    #[error("migration version {0} appears more than once")]
    Duplicate(i64),
}

/// Why migrating one tenant failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({description}) failed: {source}")]
    Failed {
        version: i64,
        description: String,
        source: sqlx::Error,
    },
    #[error("migration {version} was changed after it was applied to this schema (checksum mismatch); restore the original file or add a new migration instead")]
    ChecksumMismatch { version: i64 },
    #[error("schema has migration {version} applied, which the migration set does not contain (a tenant provisioned with the demo set needs it in its set: --demo-migrations, chart value migrations.demo=true)")]
    UnknownApplied { version: i64 },
    #[error("{message}")]
    UntrustedHistory { message: String },
    /// The schema holds objects but no migration history (the table was dropped or emptied
    /// out of band): which migrations were applied is unknown, so none is run.
    #[error("{message}")]
    HistoryMissing { message: String },
    /// A lock the migration needs (on a table, or the schema's migration lock) was not granted
    /// within the migration `lock_timeout`: typically the tenant's own transaction holds it.
    /// Nothing of the failed transaction is applied; retrying later helps.
    #[error("{}", lock_timeout_message(*.version, description, message))]
    LockTimeout {
        /// The migration that waited; `None` for the schema's migration lock.
        version: Option<i64>,
        description: String,
        /// The server's message (it names the relation when there is one).
        message: String,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl MigrateError {
    /// Whether retrying later could help without any change to the migration set.
    pub fn is_transient(&self) -> bool {
        match self {
            MigrateError::Database(e) => super::is_transient(e),
            MigrateError::Failed { source, .. } => super::is_transient(source),
            MigrateError::LockTimeout { .. } => true,
            _ => false,
        }
    }
}

fn lock_timeout_message(version: Option<i64>, description: &str, message: &str) -> String {
    let what = match version {
        Some(v) => format!("migration {v} ({description})"),
        None => format!("waiting for {description}"),
    };
    format!(
        "{what} gave up after the migration lock_timeout: {message}; a transaction of the \
         tenant's own (or another session) holds a lock it needs; nothing was applied by it and \
         it will be retried"
    )
}

include!(concat!(env!("OUT_DIR"), "/default_migrations.rs"));

impl MigrationSet {
    /// The demo set (members, projects, tasks), embedded from the repository's `migrations/`
    /// directory at build time: what `--demo-migrations` adds, for the quickstart and the tests.
    /// Never a tenant's default.
    pub fn embedded() -> Self {
        Self::from_files(
            DEFAULT_MIGRATIONS
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string())),
        )
        .expect("embedded migrations are checked at build time")
    }

    /// Loads every `*.sql` file of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io {
            path: dir.display().to_string(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Kubernetes ConfigMap volumes add `..data` symlinks and dot-directories.
            if name.starts_with('.') || !name.ends_with(".sql") {
                continue;
            }
            let sql = std::fs::read_to_string(entry.path()).map_err(io)?;
            files.push((name, sql));
        }
        Self::from_files(files)
    }

    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, LoadError> {
        let mut migrations = Vec::new();
        for (name, sql) in files {
            let stem = name
                .strip_suffix(".sql")
                .ok_or_else(|| LoadError::BadName(name.clone()))?;
            let (version, description) = stem
                .split_once('_')
                .ok_or_else(|| LoadError::BadName(name.clone()))?;
            let version: i64 = version
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| LoadError::BadName(name.clone()))?;
            let checksum = Sha256::digest(sql.as_bytes()).to_vec();
            migrations.push(Migration {
                version,
                description: description.replace('_', " "),
                sql,
                checksum,
            });
        }
        migrations.sort_by_key(|m| m.version);
        if let Some(w) = migrations.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(LoadError::Duplicate(w[0].version));
        }
        Ok(Self { migrations })
    }

    /// This set followed by `other`'s migrations (a version in both is refused): how tenants
    /// provisioned with the demo set adopt a set of their own.
    pub fn then(self, other: Self) -> Result<Self, LoadError> {
        let mut files = self.to_files();
        files.extend(other.to_files());
        Self::from_files(files)
    }

    /// The set as `<version>_<description>.sql` files, the inverse of [`MigrationSet::from_files`]
    /// (to derive a new set from this one).
    pub fn to_files(&self) -> Vec<(String, String)> {
        self.migrations
            .iter()
            .map(|m| {
                (
                    format!("{}_{}.sql", m.version, m.description.replace(' ', "_")),
                    m.sql.clone(),
                )
            })
            .collect()
    }

    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// The highest version in the set, if any.
    pub fn latest(&self) -> Option<i64> {
        self.migrations.last().map(|m| m.version)
    }

    /// Compares what a schema has applied with the set: the migrations still to run, or why the
    /// schema cannot be migrated with this set.
    pub fn pending(&self, applied: &[Applied]) -> Result<Vec<&Migration>, MigrateError> {
        for (version, checksum) in applied {
            match self.migrations.iter().find(|m| m.version == *version) {
                Some(m) if &m.checksum == checksum => {}
                Some(_) => return Err(MigrateError::ChecksumMismatch { version: *version }),
                None => return Err(MigrateError::UnknownApplied { version: *version }),
            }
        }
        Ok(self
            .migrations
            .iter()
            .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
            .collect())
    }
}

/// Whether the history table `c` is exactly what the operator creates, so that inserting into
/// it evaluates nothing anyone else wrote: the five columns with their built-in types, no
/// generated or identity column, no default but `applied_at`'s `now()`, no constraint but the
/// primary key (and NOT NULL), no index but the plain primary-key index, no inheritance.
/// Catalog reads and deparsing only.
const HISTORY_SHAPE: &str = "(
    (SELECT pg_catalog.array_agg(a.attname::text || ' ' || a.atttypid::pg_catalog.regtype::text
                                 || ' ' || a.attgenerated::text || a.attidentity::text
                                 ORDER BY a.attname)
       FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
      = ARRAY['applied_at timestamp with time zone ', 'checksum bytea ', 'description text ',
              'execution_ms bigint ', 'version bigint ']
    AND (SELECT COALESCE(pg_catalog.array_agg(a.attname::text || ' ' ||
                                    pg_catalog.pg_get_expr(d.adbin, d.adrelid)), '{}')
           FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_attribute a
             ON a.attrelid = d.adrelid AND a.attnum = d.adnum
          WHERE d.adrelid = c.oid) = ARRAY['applied_at now()']
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                     WHERE k.conrelid = c.oid AND k.contype NOT IN ('p', 'n'))
    AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid) = 1
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid
                     AND (NOT i.indisprimary OR i.indexprs IS NOT NULL OR i.indpred IS NOT NULL))
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h
                     WHERE h.inhrelid = c.oid OR h.inhparent = c.oid))";

/// The history table of `schema`, as the operator creates it.
pub fn history_ddl(schema: &crate::domain::naming::Ident) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.{HISTORY_TABLE} (
            version bigint PRIMARY KEY,
            description text NOT NULL,
            checksum bytea NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            execution_ms bigint NOT NULL
        )"
    )
}

/// Why the history table of a schema cannot be trusted.
fn untrusted_history(
    relkind: &str,
    owner: &str,
    triggers: bool,
    rules: bool,
    row_security: bool,
    columns_ok: bool,
    names: &Names,
) -> Option<String> {
    let table = format!("{}.{HISTORY_TABLE}", names.schema.as_str());
    let what = match relkind {
        "r" => None,
        "v" => Some("a view"),
        "m" => Some("a materialized view"),
        "p" => Some("a partitioned table"),
        "f" => Some("a foreign table"),
        _ => Some("not an ordinary table"),
    };
    let why = if let Some(w) = what {
        format!("{table} is {w}")
    } else if owner != names.owner.as_str() {
        format!(
            "{table} is owned by {owner:?}, not by the owner role {}",
            names.owner.as_str()
        )
    } else if triggers || rules || row_security {
        format!("{table} has triggers, rules or row-level security")
    } else if !columns_ok {
        format!(
            "{table} is not the table the operator creates (other columns, defaults, \
             constraints, indexes or inheritance)"
        )
    } else {
        return None;
    };
    Some(format!(
        "{why}; it may have been planted to run code in the operator's session, so it was not read. \
         Restore it as the ordinary table the operator created"
    ))
}

/// Applied migrations of a schema, or an empty list when it has no history table yet.
///
/// Whose code runs here: the caller's session user acts for every tenant, so the table is
/// first checked in the catalog — an ordinary table owned by the tenant's owner role, without
/// triggers, rules or row-level security, with the expected column types — and then read with
/// `FROM ONLY` (no inheritance children). Anything else is refused unread.
pub async fn applied(conn: &mut PgConnection, names: &Names) -> Result<Vec<Applied>, MigrateError> {
    let schema = &names.schema;
    #[allow(clippy::type_complexity)]
    let row: Option<(String, String, bool, bool, bool, bool)> = sqlx::query_as(&format!(
        "SELECT c.relkind::text, pg_catalog.pg_get_userbyid(c.relowner)::text, c.relhastriggers,
                c.relhasrules, c.relrowsecurity,
                {HISTORY_SHAPE}
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2",
    ))
    .bind(schema.as_str())
    .bind(HISTORY_TABLE)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((relkind, owner, triggers, rules, rls, columns_ok)) = row else {
        return Ok(Vec::new());
    };
    if let Some(message) =
        untrusted_history(&relkind, &owner, triggers, rules, rls, columns_ok, names)
    {
        return Err(MigrateError::UntrustedHistory { message });
    }
    Ok(sqlx::query_as(&format!(
        "SELECT version, checksum FROM ONLY {schema}.{HISTORY_TABLE} ORDER BY version"
    ))
    .fetch_all(&mut *conn)
    .await?)
}

/// Whether the schema holds anything but the (empty) history table: a relation, a function or
/// a type of its own. Catalog reads only.
const HOLDS_OBJECTS: &str = "SELECT EXISTS (
      SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid
         AND c.relname <> ALL ($2::pg_catalog.name[]))
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = n.oid)
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace = n.oid
                  AND t.typrelid = 0 AND t.typcategory <> 'A')
  FROM pg_catalog.pg_namespace n WHERE n.nspname = $1";

/// Refuses to migrate a schema whose history is gone (`applied` is empty) while it holds
/// objects: the migrations would fail on what exists, or, written idempotently, run a second
/// time over the tenant's data. Only asked when something would run.
async fn history_present(
    conn: &mut PgConnection,
    names: &Names,
    applied: &[Applied],
) -> Result<(), MigrateError> {
    if !applied.is_empty() {
        return Ok(());
    }
    let holds: Option<bool> = sqlx::query_scalar(HOLDS_OBJECTS)
        .bind(names.schema.as_str())
        .bind(vec![
            HISTORY_TABLE.to_string(),
            format!("{HISTORY_TABLE}_pkey"),
        ])
        .fetch_optional(&mut *conn)
        .await?;
    if holds != Some(true) {
        return Ok(());
    }
    let (schema, owner) = (names.schema.as_str(), names.owner.as_str());
    Err(MigrateError::HistoryMissing {
        message: format!(
            "schema {schema} holds tables or other objects but its migration history \
             ({schema}.{HISTORY_TABLE}) is missing or empty, so which migrations were applied \
             is unknown: none is run (they would fail on, or run a second time over, what \
             exists). Restore the table from a backup, or create it again as role {owner} with \
             one row per migration the schema already has (see the README, What happens when)"
        ),
    })
}

/// Time limits of a migration run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `statement_timeout` of each migration statement.
    pub statement_timeout_ms: u64,
    /// `lock_timeout` of each statement of the run, the schema's advisory lock included: a
    /// tenant's own transaction holding a lock the migration needs makes the migration give up
    /// after this long ([`MigrateError::LockTimeout`]) instead of queueing the tenant's users
    /// behind it.
    pub lock_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            statement_timeout_ms: 600_000,
            lock_timeout_ms: DEFAULT_LOCK_TIMEOUT_MS,
        }
    }
}

/// Default `lock_timeout` of migrations (`--migration-lock-timeout-ms`).
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 5_000;

impl Migration {
    /// Whether the migration runs inside a transaction: every file but one made only of
    /// `CREATE/DROP INDEX CONCURRENTLY` and `REINDEX … CONCURRENTLY` statements, which
    /// PostgreSQL refuses inside a transaction block.
    pub fn transactional(&self) -> bool {
        !super::lint::runs_outside_transaction(&self.sql)
    }

    fn failed(&self, source: sqlx::Error) -> MigrateError {
        match lock_not_available(&source) {
            Some(message) => MigrateError::LockTimeout {
                version: Some(self.version),
                description: self.description.clone(),
                message,
            },
            None => MigrateError::Failed {
                version: self.version,
                description: self.description.clone(),
                source,
            },
        }
    }
}

/// The server's message when `e` is a lock timeout (SQLSTATE 55P03, lock_not_available).
fn lock_not_available(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03") => {
            Some(db.message().to_string())
        }
        _ => None,
    }
}

/// Takes the schema's migration lock (bounded by the `lock_timeout` in force): one lock per
/// tenant schema, so concurrent operators never migrate the same schema twice and different
/// tenants never wait for each other. A tenant can take the same advisory lock from its own
/// session; the lock timeout bounds the wait, so that costs only this tenant a retry.
async fn advisory_lock(
    conn: &mut PgConnection,
    names: &Names,
    function: &str,
) -> Result<(), MigrateError> {
    sqlx::query(&format!(
        "SELECT pg_catalog.{function}(pg_catalog.hashtextextended($1, 0))"
    ))
    .bind(lock_key(names))
    .execute(&mut *conn)
    .await
    .map_err(|e| match lock_not_available(&e) {
        Some(message) => MigrateError::LockTimeout {
            version: None,
            description: "the schema's migration lock".into(),
            message,
        },
        None => e.into(),
    })?;
    Ok(())
}

fn lock_key(names: &Names) -> String {
    format!("tenantry.migrate:{}", names.schema.as_str())
}

/// Brings one tenant schema up to date with `set`. Runs as the tenant's owner role with the
/// schema as the only `search_path` entry, so everything the migrations create lands in the
/// schema and belongs to the owner. Returns the versions applied.
///
/// Consecutive transactional migrations run in one transaction: either every one of them is
/// applied and recorded, or none is. When every pending migration is transactional (the usual
/// case) that is the whole run, under a transaction-level advisory lock. A migration that must
/// run outside a transaction (see [`Migration::transactional`]) splits the run: the schema's
/// advisory lock is then taken for the session, the transactional runs before it commit first,
/// its statements run one by one, and its history row is written only once all succeeded. An
/// index a failed earlier attempt left INVALID (same name, found in `pg_catalog`) is dropped
/// concurrently before it is built again.
///
/// On an error the session may hold a role, settings or the advisory lock: the caller must
/// close the connection rather than reuse it ([`Admin::migrate`](super::Admin::migrate)
/// does). A run outside a transaction marks `conn` to be closed when dropped, so a cancelled
/// run cannot return it to the pool either.
///
/// Migrations are code the platform trusts: they run in the operator's session.
pub async fn migrate(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
    names: &Names,
    set: &MigrationSet,
    limits: Limits,
) -> Result<Vec<i64>, MigrateError> {
    let schema = &names.schema;
    let mut tx = Connection::begin(&mut **conn).await?;
    sqlx::Executor::execute(
        &mut *tx,
        format!("SET LOCAL lock_timeout = {}", limits.lock_timeout_ms).as_str(),
    )
    .await?;
    advisory_lock(&mut tx, names, "pg_advisory_xact_lock").await?;
    // Read (and check) the history before acting as the owner role.
    let applied_before = applied(&mut tx, names).await?;
    let pending = set.pending(&applied_before)?;
    if pending.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    history_present(&mut tx, names, &applied_before).await?;
    if pending.iter().any(|m| !m.transactional()) {
        tx.rollback().await?;
        conn.close_on_drop();
        return migrate_in_runs(conn, names, set, limits).await;
    }
    enter_owner_local(&mut tx, names, limits).await?;
    if applied_before.is_empty() {
        create_history(&mut tx, names).await?;
    }
    let mut done = Vec::new();
    for m in pending {
        apply_recorded(&mut tx, schema, m).await?;
        done.push(m.version);
    }
    tx.commit().await?;
    Ok(done)
}

/// `SET LOCAL` the owner role, the schema as `search_path` and the migration time limits.
async fn enter_owner_local(
    tx: &mut PgConnection,
    names: &Names,
    limits: Limits,
) -> Result<(), MigrateError> {
    let (owner, schema) = (&names.owner, &names.schema);
    sqlx::Executor::execute(
        &mut *tx,
        format!(
            "SET LOCAL ROLE {owner}; SET LOCAL search_path TO {schema}; \
             SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
            limits.statement_timeout_ms, limits.lock_timeout_ms
        )
        .as_str(),
    )
    .await?;
    Ok(())
}

/// Creates the history table (as the owner role, inside its transaction).
async fn create_history(tx: &mut PgConnection, names: &Names) -> Result<(), MigrateError> {
    sqlx::query(&history_ddl(&names.schema))
        .execute(&mut *tx)
        .await?;
    sqlx::Executor::execute(&mut *tx, super::tenant::revoke_history(names).as_str()).await?;
    Ok(())
}

/// Writes the history row of `m` (as the owner role).
async fn record(
    conn: &mut PgConnection,
    schema: &crate::domain::naming::Ident,
    m: &Migration,
    started: std::time::Instant,
) -> Result<(), MigrateError> {
    sqlx::query(&format!(
        "INSERT INTO {schema}.{HISTORY_TABLE} (version, description, checksum, applied_at, execution_ms) \
         VALUES ($1, $2, $3, pg_catalog.now(), $4)"
    ))
    .bind(m.version)
    .bind(&m.description)
    .bind(&m.checksum)
    .bind(started.elapsed().as_millis() as i64)
    .execute(&mut *conn)
    .await
    .map_err(|e| m.failed(e))?;
    Ok(())
}

/// Runs a transactional migration and records it, inside the caller's transaction.
async fn apply_recorded(
    tx: &mut PgConnection,
    schema: &crate::domain::naming::Ident,
    m: &Migration,
) -> Result<(), MigrateError> {
    let started = std::time::Instant::now();
    // No bound arguments: the simple query protocol, so a file may hold many statements.
    sqlx::Executor::execute(&mut *tx, m.sql.as_str())
        .await
        .map_err(|e| m.failed(e))?;
    record(tx, schema, m, started).await
}

/// The run when a pending migration must run outside a transaction, under the schema's
/// advisory lock taken for the session (its wait bounded by the migration lock_timeout).
async fn migrate_in_runs(
    conn: &mut PgConnection,
    names: &Names,
    set: &MigrationSet,
    limits: Limits,
) -> Result<Vec<i64>, MigrateError> {
    let schema = &names.schema;
    let search_path: String =
        sqlx::query_scalar("SELECT pg_catalog.current_setting('search_path')")
            .fetch_one(&mut *conn)
            .await?;
    sqlx::Executor::execute(
        &mut *conn,
        format!("SET lock_timeout = {}", limits.lock_timeout_ms).as_str(),
    )
    .await?;
    advisory_lock(conn, names, "pg_advisory_lock").await?;
    let applied_before = applied(conn, names).await?;
    let pending = set.pending(&applied_before)?;
    if !pending.is_empty() {
        history_present(conn, names, &applied_before).await?;
    }
    let mut history = !applied_before.is_empty();
    let mut done = Vec::new();
    let mut i = 0;
    while i < pending.len() {
        let transactional = pending[i..]
            .iter()
            .take_while(|m| m.transactional())
            .count();
        if transactional > 0 || !history {
            let mut tx = conn.begin().await?;
            enter_owner_local(&mut tx, names, limits).await?;
            if !history {
                create_history(&mut tx, names).await?;
                history = true;
            }
            for m in &pending[i..i + transactional] {
                apply_recorded(&mut tx, schema, m).await?;
            }
            tx.commit().await?;
            done.extend(pending[i..i + transactional].iter().map(|m| m.version));
            i += transactional;
            continue;
        }
        let m = pending[i];
        apply_outside_transaction(conn, names, m, limits).await?;
        done.push(m.version);
        i += 1;
    }
    advisory_lock(conn, names, "pg_advisory_unlock").await?;
    sqlx::Executor::execute(&mut *conn, "RESET lock_timeout").await?;
    // The connection goes back only as it came: the session user, the admin search_path.
    let clean: bool = sqlx::query_scalar(
        "SELECT current_user = session_user AND pg_catalog.current_setting('search_path') = $1",
    )
    .bind(&search_path)
    .fetch_one(&mut *conn)
    .await?;
    if !clean {
        return Err(MigrateError::Database(sqlx::Error::Protocol(
            "the migration session did not return to the operator's role and search_path".into(),
        )));
    }
    Ok(done)
}

/// Runs the statements of a migration outside a transaction, one by one (each CONCURRENTLY
/// statement is its own transaction), as the owner role in the schema; records it after all
/// succeeded. The session settings are reset on success; on failure the caller closes the
/// connection.
async fn apply_outside_transaction(
    conn: &mut PgConnection,
    names: &Names,
    m: &Migration,
    limits: Limits,
) -> Result<(), MigrateError> {
    let (owner, schema) = (&names.owner, &names.schema);
    let statements = super::lint::split(&m.sql);
    let started = std::time::Instant::now();
    // CONCURRENTLY statements take only SHARE UPDATE EXCLUSIVE, which blocks none of the
    // tenant's reads and writes, and must wait for every older transaction of the database
    // to end: under the migration lock_timeout they would fail whenever any session of any
    // tenant has a transaction open that long. Their waits are bounded by the statement
    // timeout instead.
    sqlx::Executor::execute(
        &mut *conn,
        format!(
            "SET ROLE {owner}; SET search_path TO {schema}; SET statement_timeout = {0}; \
             SET lock_timeout = {0}",
            limits.statement_timeout_ms
        )
        .as_str(),
    )
    .await?;
    // Whether the schema has an index of that name: None, or whether it is valid.
    let index_state = |index: String| {
        sqlx::query_scalar::<_, bool>(
            "SELECT i.indisvalid FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
        )
        .bind(schema.as_str())
        .bind(index)
    };
    for s in &statements {
        // The file runs outside a transaction, so it runs again from the top when the operator
        // stopped (a crash, a lost lease) after a statement finished and before the history row
        // was written: what an earlier run of the file already did is not done again.
        if let Some(index) = s.concurrent_index_name() {
            let state = index_state(index.clone())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| m.failed(e))?;
            if state == Some(true) {
                tracing::info!(schema = schema.as_str(), index, version = m.version,
                    "the index exists and is valid (built by an earlier run of this file): not built again");
                continue;
            }
            // A build interrupted earlier (a lock timeout, a cancel, a unique violation) leaves
            // an INVALID index of that name behind: drop it so the build starts afresh.
            if state == Some(false) {
                tracing::warn!(schema = schema.as_str(), index, version = m.version,
                    "dropping the INVALID index an interrupted concurrent build left, before building it again");
                sqlx::Executor::execute(
                    &mut *conn,
                    format!(
                        "DROP INDEX CONCURRENTLY IF EXISTS {schema}.{}",
                        crate::domain::naming::quote_ident(&index)
                    )
                    .as_str(),
                )
                .await
                .map_err(|e| m.failed(e))?;
            }
        }
        if let Some(index) = s.concurrent_drop_name() {
            let state = index_state(index.clone())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| m.failed(e))?;
            if state.is_none() {
                tracing::info!(
                    schema = schema.as_str(),
                    index,
                    version = m.version,
                    "the index is gone (dropped by an earlier run of this file): not dropped again"
                );
                continue;
            }
        }
        sqlx::Executor::execute(&mut *conn, &m.sql[s.start..s.end])
            .await
            .map_err(|e| m.failed(e))?;
    }
    record(conn, schema, m, started).await?;
    sqlx::Executor::execute(
        &mut *conn,
        format!(
            "RESET ROLE; RESET search_path; RESET statement_timeout; SET lock_timeout = {}",
            limits.lock_timeout_ms
        )
        .as_str(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> Result<MigrationSet, LoadError> {
        MigrationSet::from_files(files.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn orders_by_version_and_names_description() {
        let s = set(&[("10_b.sql", "b"), ("2_add_things.sql", "a")]).unwrap();
        let v: Vec<_> = s.migrations().iter().map(|m| m.version).collect();
        assert_eq!(v, [2, 10]);
        assert_eq!(s.migrations()[0].description, "add things");
        assert_eq!(s.latest(), Some(10));
    }

    #[test]
    fn rejects_bad_names_and_duplicates() {
        assert!(matches!(set(&[("x.sql", "")]), Err(LoadError::BadName(_))));
        assert!(matches!(
            set(&[("0_x.sql", "")]),
            Err(LoadError::BadName(_))
        ));
        assert!(matches!(
            set(&[("a_x.sql", "")]),
            Err(LoadError::BadName(_))
        ));
        assert!(matches!(
            set(&[("1_x.sql", ""), ("01_y.sql", "")]),
            Err(LoadError::Duplicate(1))
        ));
    }

    #[test]
    fn pending_detects_changes() {
        let s = set(&[("1_a.sql", "a"), ("2_b.sql", "b")]).unwrap();
        let ck = s.migrations()[0].checksum.clone();
        assert_eq!(s.pending(&[]).unwrap().len(), 2);
        assert_eq!(s.pending(&[(1, ck)]).unwrap()[0].version, 2);
        assert!(matches!(
            s.pending(&[(1, vec![0])]),
            Err(MigrateError::ChecksumMismatch { version: 1 })
        ));
        assert!(matches!(
            s.pending(&[(3, vec![0])]),
            Err(MigrateError::UnknownApplied { version: 3 })
        ));
    }

    #[test]
    fn a_lock_timeout_is_retryable_and_says_whose_lock_it_is() {
        let e = MigrateError::LockTimeout {
            version: Some(3),
            description: "add note".into(),
            message: "canceling statement due to lock timeout".into(),
        };
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(text.starts_with("migration 3 (add note) gave up after the migration lock_timeout: canceling statement due to lock timeout"), "{text}");
        assert!(
            text.contains("tenant's own") && text.contains("will be retried"),
            "{text}"
        );
        let e = MigrateError::LockTimeout {
            version: None,
            description: "the schema's migration lock".into(),
            message: "canceling statement due to lock timeout".into(),
        };
        assert!(e.is_transient());
        assert!(e
            .to_string()
            .starts_with("waiting for the schema's migration lock gave up"));
        // The refusals stay permanent.
        assert!(!MigrateError::ChecksumMismatch { version: 1 }.is_transient());
        assert!(!MigrateError::UnknownApplied { version: 1 }.is_transient());
    }

    #[test]
    fn only_files_of_concurrent_statements_run_outside_a_transaction() {
        let s = set(&[
            ("1_t.sql", "CREATE TABLE t (x int);"),
            (
                "2_i.sql",
                "-- lookups\nCREATE INDEX CONCURRENTLY t_x ON t (x);",
            ),
            (
                "3_mixed.sql",
                "CREATE TABLE u (x int); CREATE INDEX CONCURRENTLY u_x ON u (x);",
            ),
        ])
        .unwrap();
        let tx: Vec<bool> = s
            .migrations()
            .iter()
            .map(Migration::transactional)
            .collect();
        assert_eq!(tx, [true, false, true]);
    }

    #[test]
    fn embedded_set_is_valid() {
        let s = MigrationSet::embedded();
        assert!(s.latest().unwrap() >= 1);
    }
}
