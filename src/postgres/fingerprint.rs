//! Schema fingerprints for drift detection: the tables (ordinary and partitioned), columns,
//! constraints and indexes of tenant schemas, read for the whole fleet by one catalog query
//! (a hash per schema), the full descriptors of the few schemas whose hash is unexpected, and
//! the reference of every migration version, built in a scratch tenant of the operator's own.
//!
//! Whose code runs here: the admin session, which acts for every tenant, so only catalog
//! reads and the catalog's deparsers (`format_type`, `pg_get_expr`, `pg_get_constraintdef`,
//! `pg_get_indexdef`, `quote_ident`, `md5`), all `pg_catalog`-qualified, with `search_path =
//! pg_catalog`. Deparsing evaluates nothing of the tenant's: it prints expression trees, and
//! the only functions it calls are the output functions of the constants in them, which are
//! built-in or C functions only a superuser can install (a domain, enum, composite or range
//! type prints through its base types' built-in output functions). No view, function,
//! operator, trigger or policy of a tenant is read through or called, and no tenant table's
//! rows are read. The deparsers take ACCESS SHARE on the relation they describe, so they wait
//! behind a tenant holding ACCESS EXCLUSIVE on its own table: schemas with such a lock (granted
//! or queued) are left out of the scan up front, and a lock taken in between costs at most
//! [`SCAN_LOCK_TIMEOUT_MS`] per halving of the batch until that schema is isolated and skipped.
//! Data, ownership, grants and statistics are not part of a fingerprint.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{future::BoxFuture, FutureExt};
use sqlx::Connection;

use super::{
    migrations::{MigrateError, MigrationSet},
    tenant::{Logins, Names, RolesToDrop},
    Admin,
};
use crate::domain::{
    drift::Descriptor,
    naming::{scratch_ident, SCRATCH_PREFIX},
    scram,
    state::{Holder, Observed, Owner},
};

/// How long a fingerprint statement waits for a relation's lock, in milliseconds.
pub const SCAN_LOCK_TIMEOUT_MS: u64 = 1000;
/// `statement_timeout` of one fleet scan statement, in milliseconds.
pub const SCAN_STATEMENT_TIMEOUT_MS: u64 = 300_000;

/// The descriptors of the schemas named in `$1` (`name[]`), as `d(nsp, kind, name, tbl,
/// fields)`, and `s(oid, nsp, q, busy)` for each schema that exists: `busy` when a relation of
/// it is locked ACCESS EXCLUSIVE (granted or queued), and then it has no descriptors. The
/// operator's own history table is left out. `q` is the schema's qualification as the
/// deparsers print it, taken out of every deparsed text.
const DESCRIPTORS: &str = "
WITH locked AS (
  SELECT DISTINCT c.relnamespace
    FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_class c ON c.oid = l.relation
   WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
     AND l.database = (SELECT b.oid FROM pg_catalog.pg_database b
                        WHERE b.datname = pg_catalog.current_database())
),
s AS (
  SELECT n.oid, n.nspname::pg_catalog.text AS nsp,
         pg_catalog.quote_ident(n.nspname) || '.' AS q,
         n.oid IN (SELECT relnamespace FROM locked) AS busy
    FROM pg_catalog.pg_namespace n
    JOIN (SELECT DISTINCT w FROM pg_catalog.unnest($1::pg_catalog.name[]) w) want
      ON want.w = n.nspname
),
t AS (
  SELECT s.nsp, s.q, c.oid, c.relname::pg_catalog.text AS rel, c.relkind
    FROM s JOIN pg_catalog.pg_class c ON c.relnamespace = s.oid
   WHERE NOT s.busy AND c.relkind IN ('r', 'p') AND c.relname <> 'tenantry_migrations'
),
d AS (
  SELECT t.nsp, 'table'::pg_catalog.text AS kind, t.rel AS name, t.rel AS tbl,
         ARRAY['kind', CASE t.relkind WHEN 'p' THEN 'partitioned' ELSE 'ordinary' END,
               'partition of',
               COALESCE((SELECT p.relname::pg_catalog.text
                           FROM pg_catalog.pg_inherits h
                           JOIN pg_catalog.pg_class p ON p.oid = h.inhparent
                          WHERE h.inhrelid = t.oid ORDER BY 1 LIMIT 1), 'none')] AS fields
    FROM t
  UNION ALL
  SELECT t.nsp, 'column', t.rel || '.' || a.attname::pg_catalog.text, t.rel,
         ARRAY['type', pg_catalog.replace(pg_catalog.format_type(a.atttypid, a.atttypmod), t.q, ''),
               'not null', CASE WHEN a.attnotnull THEN 'yes' ELSE 'no' END,
               'default', COALESCE(pg_catalog.replace(
                   pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), t.q, ''), 'none'),
               'identity', CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default'
                                ELSE 'no' END,
               'generated', CASE a.attgenerated WHEN 's' THEN 'stored' WHEN 'v' THEN 'virtual'
                                 ELSE 'no' END]
    FROM t
    JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = t.oid AND ad.adnum = a.attnum
  UNION ALL
  SELECT t.nsp, 'constraint', t.rel || '.' || k.conname::pg_catalog.text, t.rel,
         ARRAY['definition', pg_catalog.replace(pg_catalog.pg_get_constraintdef(k.oid), t.q, '')]
    FROM t JOIN pg_catalog.pg_constraint k ON k.conrelid = t.oid
  UNION ALL
  SELECT t.nsp, 'index', i.relname::pg_catalog.text, t.rel,
         ARRAY['definition', pg_catalog.replace(pg_catalog.pg_get_indexdef(x.indexrelid), t.q, '')]
    FROM t
    JOIN pg_catalog.pg_index x ON x.indrelid = t.oid
    JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
)";

/// The fingerprint of every schema of `$1`: the md5 of its descriptors, one line each, in
/// (kind, name) order; NULL for a busy schema (see [`DESCRIPTORS`]).
fn hash_query() -> String {
    format!(
        "{DESCRIPTORS}
SELECT s.nsp, CASE WHEN s.busy THEN NULL ELSE pg_catalog.md5(COALESCE(pg_catalog.string_agg(
         d.kind || ' ' || d.name || E'\\x1f' || pg_catalog.array_to_string(d.fields, E'\\x1f'),
         E'\\n' ORDER BY d.kind COLLATE pg_catalog.\"C\", d.name COLLATE pg_catalog.\"C\"), '')) END
  FROM s LEFT JOIN d ON d.nsp = s.nsp
 GROUP BY s.nsp, s.busy"
    )
}

/// Every descriptor of every schema of `$1`, and whether it was busy.
fn descriptor_query() -> String {
    format!(
        "{DESCRIPTORS}
SELECT s.nsp, s.busy, d.kind, d.name, d.tbl, d.fields
  FROM s LEFT JOIN d ON d.nsp = s.nsp"
    )
}

/// One scan of some schemas.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan<T> {
    /// What was read, per schema.
    pub of: BTreeMap<String, T>,
    /// Schemas not read this time: a relation of theirs is locked ACCESS EXCLUSIVE.
    pub busy: Vec<String>,
}

impl<T> Scan<T> {
    /// Adds another scan's findings (another batch, another server).
    pub fn merge(&mut self, other: Scan<T>) {
        self.of.extend(other.of);
        self.busy.extend(other.busy);
    }
}

/// The fingerprint of one migration version: its hash and descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub hash: String,
    pub descriptors: Vec<Descriptor>,
}

/// The references of every version of a migration set (`None`: before any migration).
pub type References = BTreeMap<Option<i64>, Reference>;

/// Why the references could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Tenant(#[from] super::Error),
    #[error("building the reference schema: {0}")]
    Migration(#[from] MigrateError),
    #[error("the reference schema {0} was locked while it was read")]
    Busy(String),
}

/// Name of the mark ([`Owner`]) on the operator's scratch tenants: no Tenant has an empty
/// namespace, so no Tenant's reconcile or deletion takes them for its own.
const SCRATCH_MARK: &str = "schema-drift-reference";
/// A scratch tenant left by another process is dropped once its mark is this old (a build
/// takes seconds; an operator that crashed mid-build left it).
const SCRATCH_STALE: Duration = Duration::from_secs(900);

/// This process, in the scratch tenants' names and marks.
fn instance() -> u32 {
    static INSTANCE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *INSTANCE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        nanos ^ std::process::id().rotate_left(16)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Whether a scratch mark's `uid` (`<instance>@<unix seconds>`) says it may be dropped now:
/// this process made it, or it is older than [`SCRATCH_STALE`].
fn scratch_droppable(uid: &str, me: u32, now: u64) -> bool {
    let Some((who, at)) = uid.split_once('@') else {
        return false;
    };
    who == format!("{me:08x}")
        || at
            .parse::<u64>()
            .is_ok_and(|at| now.saturating_sub(at) > SCRATCH_STALE.as_secs())
}

/// The scratch tenant a name of the operator's belongs to: `tenantry$ref_<hex>`, from the
/// schema or any of its roles.
fn scratch_base(name: &str) -> Option<String> {
    let rest = name.strip_prefix(SCRATCH_PREFIX)?.strip_prefix("ref_")?;
    let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    let tail = &rest[hex.len()..];
    (!hex.is_empty() && ["", "_owner", "_b"].contains(&tail)).then(|| format!("ref_{hex}"))
}

impl Admin {
    /// The fingerprint hash of each of `schemas` (schemas that do not exist are absent), in
    /// one statement; see the module's note on locks.
    pub async fn fingerprint_hashes(
        &self,
        schemas: &[String],
    ) -> Result<Scan<String>, sqlx::Error> {
        self.scan(
            schemas,
            &hash_query(),
            |rows: Vec<(String, Option<String>)>| {
                let mut out = Scan::default();
                for (nsp, hash) in rows {
                    match hash {
                        Some(h) => {
                            out.of.insert(nsp, h);
                        }
                        None => out.busy.push(nsp),
                    }
                }
                out
            },
        )
        .await
    }

    /// The descriptors of each of `schemas`, in one statement.
    pub async fn fingerprint_descriptors(
        &self,
        schemas: &[String],
    ) -> Result<Scan<Vec<Descriptor>>, sqlx::Error> {
        type Row = (
            String,
            bool,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<Vec<String>>,
        );
        self.scan(schemas, &descriptor_query(), |rows: Vec<Row>| {
            let mut out: Scan<Vec<Descriptor>> = Scan::default();
            for (nsp, busy, kind, name, table, fields) in rows {
                if busy {
                    out.busy.push(nsp);
                    continue;
                }
                let list = out.of.entry(nsp).or_default();
                if let (Some(kind), Some(name), Some(table), Some(fields)) =
                    (kind, name, table, fields)
                {
                    let fields = fields
                        .chunks(2)
                        .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
                        .collect();
                    list.push(Descriptor {
                        kind,
                        name,
                        table,
                        fields,
                    });
                }
            }
            out.busy.dedup();
            out
        })
        .await
    }

    /// Runs `sql` over `schemas` in one statement; should a lock be taken between the busy
    /// check and the deparsing (the statement gives up after [`SCAN_LOCK_TIMEOUT_MS`]), the
    /// batch is halved until the locked schema is alone, and skipped as busy.
    fn scan<'a, R, T>(
        &'a self,
        schemas: &'a [String],
        sql: &'a str,
        read: fn(Vec<R>) -> Scan<T>,
    ) -> BoxFuture<'a, Result<Scan<T>, sqlx::Error>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + 'a,
        T: Send + 'a,
    {
        async move {
            if schemas.is_empty() {
                return Ok(Scan {
                    of: BTreeMap::new(),
                    busy: Vec::new(),
                });
            }
            let once = async {
                let mut conn = self.pool.acquire().await?;
                let mut tx = conn.begin().await?;
                sqlx::Executor::execute(
                    &mut *tx,
                    format!(
                        "SET LOCAL lock_timeout = {SCAN_LOCK_TIMEOUT_MS}; \
                         SET LOCAL statement_timeout = {SCAN_STATEMENT_TIMEOUT_MS}"
                    )
                    .as_str(),
                )
                .await?;
                let rows: Vec<R> = sqlx::query_as(sql)
                    .bind(schemas)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            };
            match once.await {
                Ok(rows) => Ok(read(rows)),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    if let [one] = schemas {
                        return Ok(Scan {
                            of: BTreeMap::new(),
                            busy: vec![one.clone()],
                        });
                    }
                    let (a, b) = schemas.split_at(schemas.len() / 2);
                    let mut out = self.scan(a, sql, read).await?;
                    out.merge(self.scan(b, sql, read).await?);
                    Ok(out)
                }
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    /// The reference fingerprint of every version of `set` (and of the schema before any
    /// migration), from a scratch tenant provisioned through the same steps as every tenant
    /// (roles, schema, then the migrations up to each version in turn, as the owner role) and
    /// dropped afterwards. Scratch tenants another run left behind are dropped first.
    pub async fn build_references(&self, set: &MigrationSet) -> Result<References, ReferenceError> {
        self.drop_stale_scratch().await?;
        static BUILDS: AtomicU32 = AtomicU32::new(0);
        let n = BUILDS.fetch_add(1, Ordering::Relaxed);
        let names = Names::new(scratch_ident(&format!("ref_{:08x}{n:04x}", instance())));
        let mark = Owner::new(
            "",
            SCRATCH_MARK,
            &format!("{:08x}@{}", instance(), unix_now()),
        );
        let built = self.build_in(&names, &mark, set).await;
        let dropped = self.drop_scratch(&names).await;
        let refs = built?;
        dropped?;
        Ok(refs)
    }

    async fn build_in(
        &self,
        names: &Names,
        mark: &Owner,
        set: &MigrationSet,
    ) -> Result<References, ReferenceError> {
        let nothing = Observed::default();
        // Never a login: the password is thrown away.
        let password = scram::generate_password();
        self.ensure_roles(
            names,
            mark,
            &nothing,
            Some(&password),
            &Logins {
                app: false,
                b: false,
                retire: None,
            },
            &self.login_settings(Some(0), None),
        )
        .await?;
        self.ensure_schema(names, mark, &nothing, set, false, false)
            .await?;
        let mut refs = References::new();
        refs.insert(None, self.reference_of(names).await?);
        let files = set.to_files();
        for (i, m) in set.migrations().iter().enumerate() {
            let upto = MigrationSet::from_files(files[..=i].iter().cloned())
                .expect("a prefix of a valid set is valid");
            self.migrate(names, &upto).await?;
            refs.insert(Some(m.version), self.reference_of(names).await?);
        }
        Ok(refs)
    }

    async fn reference_of(&self, names: &Names) -> Result<Reference, ReferenceError> {
        let schema = [names.schema.as_str().to_string()];
        let hash = self.fingerprint_hashes(&schema).await?;
        let descriptors = self.fingerprint_descriptors(&schema).await?;
        match (
            hash.of.into_values().next(),
            descriptors.of.into_values().next(),
        ) {
            (Some(hash), Some(descriptors)) => Ok(Reference { hash, descriptors }),
            _ => Err(ReferenceError::Busy(names.schema.as_str().to_string())),
        }
    }

    /// Drops what of the scratch tenant `names` carries a scratch mark (the deletion of a
    /// Tenant with `deletionPolicy: Delete`).
    async fn drop_scratch(&self, names: &Names) -> Result<(), sqlx::Error> {
        let observed = self.observe_tenant(names).await?;
        let me = Owner::new("", SCRATCH_MARK, "");
        let ours = |h: Holder| h == Holder::ThisTenant;
        let schema = ours(observed.schema_holder(&me));
        let drop = RolesToDrop {
            app: ours(observed.role_holder(&me)),
            owner: ours(observed.owner_role_holder(&me)),
            login_b: ours(observed.login_b_holder(&me)),
        };
        if schema || drop != RolesToDrop::default() {
            self.drop_tenant_roles(names, schema, drop).await?;
        }
        Ok(())
    }

    /// Scratch tenants an earlier run left behind (it crashed, or lost its connection while
    /// dropping one): this process's, or another's older than [`SCRATCH_STALE`]. Best effort.
    async fn drop_stale_scratch(&self) -> Result<(), sqlx::Error> {
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::pg_catalog.text FROM pg_catalog.pg_namespace
              WHERE pg_catalog.starts_with(nspname::pg_catalog.text, $1)
             UNION
             SELECT rolname::pg_catalog.text FROM pg_catalog.pg_roles
              WHERE pg_catalog.starts_with(rolname::pg_catalog.text, $1)",
        )
        .bind(SCRATCH_PREFIX)
        .fetch_all(&self.pool)
        .await?;
        let mut bases: Vec<String> = found.iter().filter_map(|n| scratch_base(n)).collect();
        bases.sort();
        bases.dedup();
        let (me, now) = (instance(), unix_now());
        for base in bases {
            let names = Names::new(scratch_ident(&base));
            let observed = self.observe_tenant(&names).await?;
            let marks = [
                observed.schema.as_ref().and_then(|s| s.owner.as_ref()),
                observed.role.as_ref().and_then(|r| r.owner.as_ref()),
                observed.owner_role.as_ref().and_then(|r| r.owner.as_ref()),
                observed.login_b.as_ref().and_then(|r| r.owner.as_ref()),
            ];
            let stale = marks.iter().flatten().any(|o| {
                o.namespace.is_empty()
                    && o.name == SCRATCH_MARK
                    && scratch_droppable(&o.uid, me, now)
            });
            if stale {
                tracing::info!(scratch = %base, "dropping a schema drift reference left behind");
                // One that cannot be dropped (made by an admin with other rights) is left to
                // an administrator; it does not stop this build.
                if let Err(e) = self.drop_scratch(&names).await {
                    tracing::warn!(scratch = %base, error = %e, "could not drop a schema drift reference left behind");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::migrations::HISTORY_TABLE;

    #[test]
    fn scratch_names_lead_back_to_their_tenant() {
        assert_eq!(
            scratch_base("tenantry$ref_00ab12cd0001").as_deref(),
            Some("ref_00ab12cd0001")
        );
        assert_eq!(
            scratch_base("tenantry$ref_00ab12cd0001_owner").as_deref(),
            Some("ref_00ab12cd0001")
        );
        assert_eq!(scratch_base("tenantry$ref_0a_b").as_deref(), Some("ref_0a"));
        assert_eq!(scratch_base("tenantry$ref_0a_x"), None);
        assert_eq!(scratch_base("tenantry$other"), None);
        assert_eq!(scratch_base("acme_owner"), None);
    }

    #[test]
    fn only_own_or_stale_scratch_is_dropped() {
        let me = 0x00ab12cd;
        assert!(scratch_droppable("00ab12cd@1000", me, 1001));
        assert!(!scratch_droppable("11111111@1000", me, 1001));
        assert!(scratch_droppable("11111111@1000", me, 1000 + 901));
        assert!(!scratch_droppable("garbage", me, 99999));
    }

    #[test]
    fn the_queries_read_the_catalog_only() {
        for q in [hash_query(), descriptor_query()] {
            // Every function is the catalog's.
            for f in [
                "format_type(",
                "pg_get_expr(",
                "pg_get_constraintdef(",
                "pg_get_indexdef(",
                "quote_ident(",
                "md5(",
                "replace(",
                "string_agg(",
            ] {
                for (i, _) in q.match_indices(f) {
                    assert!(q[..i].ends_with("pg_catalog."), "{f} unqualified");
                }
            }
            assert!(q.contains(&format!("'{HISTORY_TABLE}'")));
        }
    }
}
