//! Lock-safe migration steps against real tenants: a tenant's own transaction holding a lock
//! makes a migration give up within the migration lock_timeout (nothing applied) and succeed
//! once released; a file of CONCURRENTLY statements runs outside a transaction, recovers from
//! the INVALID index a failed build leaves, and never returns a dirty connection to the pool;
//! `migrations plan` reports the fleet and writes nothing.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Row};
use tenantry::{
    domain::{crd::Tenant, naming::Ident},
    postgres::{
        migrations::{MigrateError, MigrationSet},
        plan::{self, Outcome},
        tenant::Names,
        Admin,
    },
};

use crate::common::*;

fn set_with(extra: &[(&str, &str)]) -> MigrationSet {
    let mut files = MigrationSet::embedded().to_files();
    files.extend(extra.iter().map(|(n, s)| (n.to_string(), s.to_string())));
    MigrationSet::from_files(files).unwrap()
}

/// Tenants provisioned at the demo set's version 2; the operator is stopped again.
async fn provision(ns: &TestNs, names: &[&str]) {
    let _ctl = RunningController::start(ns).await;
    for n in names {
        ns.create(Tenant::test(n)).await;
    }
    for n in names {
        wait_ready(ns, n).await;
    }
}

fn names(ns: &TestNs, tenant: &str) -> Names {
    Names::new(Ident::parse("schema", &ns.schema(tenant)).unwrap())
}

/// A session of the tenant's own login role.
async fn tenant_session(ns: &TestNs, tenant: &str) -> PgConnection {
    let uri = secret_value(
        &ns.secrets().get(&format!("{tenant}-db")).await.unwrap(),
        "uri",
    );
    PgConnection::connect(&uri).await.unwrap()
}

/// One admin connection at most, so a connection returned to the pool would be the next one.
fn admin(lock_timeout_ms: u64) -> Admin {
    Admin::new(&env().database_url, 1, None, None)
        .unwrap()
        .with_migration_lock_timeout(lock_timeout_ms)
}

async fn history(schema: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM {schema}.tenantry_migrations ORDER BY version"
    ))
    .fetch_all(&pg().await)
    .await
    .unwrap()
}

/// The pooled admin connection is as the operator made it: its own role, pg_catalog alone.
async fn assert_pool_clean(admin: &Admin) {
    let row = sqlx::query(
        "SELECT current_user = session_user, current_setting('search_path'), \
                current_setting('statement_timeout')",
    )
    .fetch_one(admin.pool())
    .await
    .unwrap();
    assert!(row.get::<bool, _>(0), "the pooled connection kept a role");
    assert_eq!(row.get::<String, _>(1), "pg_catalog");
    assert_eq!(row.get::<String, _>(2), "30s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_lock_makes_a_migration_give_up_fast_and_it_succeeds_once_released() {
    let ns = TestNs::new().await;
    provision(&ns, &["lk"]).await;
    let names = names(&ns, "lk");
    let schema = ns.schema("lk");
    let set = set_with(&[("3_note.sql", "ALTER TABLE tasks ADD COLUMN note text;")]);
    let admin = admin(500);

    // The tenant's own transaction holds the table.
    let mut tenant = tenant_session(&ns, "lk").await;
    sqlx::Executor::execute(
        &mut tenant,
        "BEGIN; LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let err = admin.migrate(&names, &set).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&err, MigrateError::LockTimeout { version: Some(3), message, .. } if message.contains("lock")),
        "{err:?}"
    );
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains("migration 3 (note)")
            && text.contains("tenant's own")
            && text.contains("retried"),
        "{text}"
    );
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(4),
        "gave up after {waited:?}"
    );
    assert_eq!(history(&schema).await, [1, 2], "nothing applied");
    assert_pool_clean(&admin).await;

    sqlx::Executor::execute(&mut tenant, "ROLLBACK")
        .await
        .unwrap();
    // The schema's migration lock, taken from the tenant's session, is bounded the same way.
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("tenantry.migrate:{schema}"))
        .execute(&mut tenant)
        .await
        .unwrap();
    let started = Instant::now();
    let err = admin.migrate(&names, &set).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::LockTimeout { version: None, .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(history(&schema).await, [1, 2]);
    tenant.close().await.unwrap();

    // Released: the same run succeeds.
    assert_eq!(admin.migrate(&names, &set).await.unwrap(), [3]);
    assert_eq!(history(&schema).await, [1, 2, 3]);
    assert_pool_clean(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_index_file_runs_outside_a_transaction_and_recovers_from_a_failed_build() {
    let ns = TestNs::new().await;
    provision(&ns, &["ci"]).await;
    let names = names(&ns, "ci");
    let schema = ns.schema("ci");
    let mut tenant = tenant_session(&ns, "ci").await;
    // Real rows, two with the same title: the unique build fails and leaves an INVALID index.
    sqlx::Executor::execute(
        &mut tenant,
        "INSERT INTO projects (name) VALUES ('p');
         INSERT INTO tasks (project_id, title) SELECT id, 'same' FROM projects;
         INSERT INTO tasks (project_id, title) SELECT id, 'same' FROM projects;
         INSERT INTO tasks (project_id, title) SELECT p.id, 't' || g FROM projects p, generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    let set = set_with(&[
        (
            "3_before.sql",
            "ALTER TABLE tasks ADD COLUMN before_idx text;",
        ),
        (
            "4_title_key.sql",
            "-- Built without blocking the tenant's writes.\n\
             CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS tasks_title_key ON tasks (title);\n\
             DROP INDEX CONCURRENTLY IF EXISTS tasks_no_such_idx;",
        ),
        (
            "5_after.sql",
            "ALTER TABLE tasks ADD COLUMN after_idx text;",
        ),
    ]);
    assert!(tenantry::postgres::lint::lint(&set).is_empty());
    assert!(!set.migrations()[3].transactional());
    let admin = admin(500);

    let err = admin.migrate(&names, &set).await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::Failed { version: 4, source, .. } if source.to_string().contains("could not create unique index")),
        "{err:?}"
    );
    // The transactional run before it committed; the failed file is not recorded.
    assert_eq!(history(&schema).await, [1, 2, 3]);
    let valid = |pool: sqlx::PgPool, schema: String| async move {
        sqlx::query_scalar::<_, bool>(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = 'tasks_title_key'",
        )
        .bind(schema)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    assert_eq!(
        valid(pg().await, schema.clone()).await,
        Some(false),
        "an INVALID index is left"
    );
    assert_pool_clean(&admin).await;

    // While the tenant holds the schema's migration lock, the retry gives up fast.
    let mut holder = tenant_session(&ns, "ci").await;
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("tenantry.migrate:{schema}"))
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let err = admin.migrate(&names, &set).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::LockTimeout { version: None, .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    holder.close().await.unwrap();
    assert_eq!(history(&schema).await, [1, 2, 3]);
    assert_pool_clean(&admin).await;

    // The tenant fixes its data, in a transaction still open when the retry starts: the
    // concurrent build waits for it (it blocks none of the tenant's writes) instead of failing.
    sqlx::Executor::execute(
        &mut tenant,
        "BEGIN; UPDATE tasks SET title = 'other' WHERE id = (SELECT min(id) FROM tasks)",
    )
    .await
    .unwrap();
    let retry = tokio::spawn({
        let admin = admin.clone();
        let names = names.clone();
        let set = set.clone();
        async move { admin.migrate(&names, &set).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !retry.is_finished(),
        "the build waits for the tenant's transaction"
    );
    sqlx::Executor::execute(&mut tenant, "COMMIT")
        .await
        .unwrap();
    assert_eq!(retry.await.unwrap().unwrap(), [4, 5]);
    assert_eq!(history(&schema).await, [1, 2, 3, 4, 5]);
    assert_eq!(
        valid(pg().await, schema.clone()).await,
        Some(true),
        "rebuilt, valid"
    );
    assert_pool_clean(&admin).await;
    // The index belongs to the owner role, like everything migrations create.
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(c.relowner)::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'tasks_title_key'",
    )
    .bind(&schema)
    .fetch_one(&pg().await)
    .await
    .unwrap();
    assert_eq!(owner, names.owner.as_str());
    // Nothing left to do, and the tenant's writes go on.
    assert!(admin.migrate(&names, &set).await.unwrap().is_empty());
    sqlx::Executor::execute(
        &mut tenant,
        "INSERT INTO tasks (project_id, title) SELECT id, 'new' FROM projects",
    )
    .await
    .unwrap();
}

/// A file of CONCURRENTLY statements without `IF [NOT] EXISTS` runs again after the operator
/// stopped between a finished statement and its history row (here: the index already built
/// and the other already dropped, as that earlier run left them): it completes and is
/// recorded once, instead of failing on what it already did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_file_interrupted_after_its_statements_runs_again_cleanly() {
    let ns = TestNs::new().await;
    provision(&ns, &["rerun"]).await;
    let names = names(&ns, "rerun");
    let schema = ns.schema("rerun");
    let set = set_with(&[
        (
            "3_old_idx.sql",
            "CREATE INDEX rerun_old_idx ON tasks (title);",
        ),
        (
            "4_swap.sql",
            "CREATE INDEX CONCURRENTLY rerun_new_idx ON tasks (title);\n\
             DROP INDEX CONCURRENTLY rerun_old_idx;",
        ),
    ]);
    assert!(!set.migrations()[3].transactional());
    let admin = admin(500);
    // The first three files; then what the interrupted run of file 4 did, by hand.
    let first = set_with(&[(
        "3_old_idx.sql",
        "CREATE INDEX rerun_old_idx ON tasks (title);",
    )]);
    assert_eq!(admin.migrate(&names, &first).await.unwrap(), [3]);
    let db = pg().await;
    sqlx::Executor::execute(
        &db,
        format!(
            "SET ROLE \"{owner}\"; CREATE INDEX rerun_new_idx ON \"{schema}\".tasks (title); \
             DROP INDEX \"{schema}\".rerun_old_idx; RESET ROLE",
            owner = names.owner.as_str()
        )
        .as_str(),
    )
    .await
    .unwrap();
    assert_eq!(admin.migrate(&names, &set).await.unwrap(), [4]);
    assert_eq!(history(&schema).await, [1, 2, 3, 4]);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname LIKE 'rerun_%' ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(indexes, ["rerun_new_idx"]);
    assert_pool_clean(&admin).await;
}

/// What `plan` must not change: every history row and every object of the schemas.
async fn snapshot(schemas: &[String]) -> Vec<String> {
    let db = pg().await;
    let mut out = Vec::new();
    for s in schemas {
        let rows: Vec<(i64, Vec<u8>, String, i64)> = sqlx::query_as(&format!(
            "SELECT version, checksum, applied_at::text, execution_ms FROM {s}.tenantry_migrations ORDER BY 1"
        ))
        .fetch_all(&db)
        .await
        .unwrap();
        out.push(format!("{s}: {rows:?}"));
        let objects: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.relname::text, c.relkind::text, c.xmin::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1",
        )
        .bind(s)
        .fetch_all(&db)
        .await
        .unwrap();
        out.push(format!("{s}: {objects:?}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_what_would_run_and_writes_nothing() {
    let ns = TestNs::new().await;
    provision(&ns, &["pa", "pb"]).await;
    let (a, b) = (ns.schema("pa"), ns.schema("pb"));
    // pb's migration 2 was applied with other content than the set's.
    sqlx::query(&format!(
        "UPDATE {b}.tenantry_migrations SET checksum = '\\x00' WHERE version = 2"
    ))
    .execute(&pg().await)
    .await
    .unwrap();
    // A Tenant created while no operator runs has no schema yet.
    ns.create(Tenant::test("pc")).await;
    let schemas = [a.clone(), b.clone()];
    let before = snapshot(&schemas).await;
    let tenants_before: Vec<_> = ns
        .tenants()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.metadata.resource_version.clone())
        .collect();

    let set = set_with(&[
        ("3_more.sql", "CREATE TABLE labels (id int PRIMARY KEY);"),
        (
            "4_lookup.sql",
            "CREATE INDEX tasks_title_idx ON tasks (title);",
        ),
    ]);
    let plan = plan::plan(&env().database_url, &set, None).await.unwrap();
    let find = |s: &str| plan.tenants.iter().find(|t| t.schema == s).unwrap();
    let pa = find(&a);
    assert_eq!(
        (pa.namespace.as_str(), pa.name.as_str()),
        (ns.name.as_str(), "pa")
    );
    assert_eq!(pa.current_version, Some(2));
    assert_eq!(
        pa.outcome,
        Outcome::Migrate {
            versions: vec![3, 4]
        }
    );
    assert!(
        matches!(&find(&b).outcome, Outcome::Refused { reason } if reason.contains("migration 2 was changed")),
        "{:?}",
        find(&b)
    );
    assert_eq!(plan.lint.len(), 1);
    assert_eq!(
        (plan.lint[0].file.as_str(), plan.lint[0].line),
        ("4_lookup.sql", 1)
    );
    let text = plan.render(plan::Output::Text);
    assert!(
        text.contains(&format!(
            "{}/pa (schema {a}, at 2): would run 3, 4",
            ns.name
        )),
        "{text}"
    );
    assert!(
        text.contains("4_lookup.sql:1: [create-index-non-concurrent]"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&plan.render(plan::Output::Json)).unwrap();
    assert!(json["wouldMigrate"].as_u64().unwrap() >= 1);

    assert!(
        plan.tenants.iter().all(|t| t.name != "pc"),
        "without Kubernetes only schemas are known"
    );

    // With the Tenants listed from Kubernetes: matched, and the new one reported.
    let listed = ns.tenants().list(&Default::default()).await.unwrap().items;
    let known = plan::known_tenants(&listed);
    let plan = plan::plan(&env().database_url, &set, Some(&known))
        .await
        .unwrap();
    let find = |s: &str| plan.tenants.iter().find(|t| t.schema == s).unwrap();
    assert_eq!(find(&a).tenant_found, Some(true));
    assert_eq!(find(&a).status_version, Some(2));
    let pc = find(&ns.schema("pc"));
    assert_eq!(pc.outcome, Outcome::NotProvisioned);
    assert_eq!(pc.name, "pc");
    assert!(plan.not_provisioned >= 1);

    assert_eq!(snapshot(&schemas).await, before, "plan changed a schema");
    let tenants_after: Vec<_> = ns
        .tenants()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.metadata.resource_version.clone())
        .collect();
    assert_eq!(tenants_after, tenants_before, "plan wrote to the apiserver");
    // No table of the set was created anywhere.
    let labels: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{a}.labels"))
        .fetch_one(&pg().await)
        .await
        .unwrap();
    assert_eq!(labels, None);
}

#[test]
fn the_lint_command_lists_findings_and_fails_on_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("3_lookup.sql"),
        "-- Look tasks up by title.\nCREATE INDEX tasks_title_idx ON tasks (title);\n",
    )
    .unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args([
                "migrations",
                "lint",
                "--demo-migrations",
                "--migrations-dir",
            ])
            .arg(dir.path())
            .env_remove("TENANTRY_MIGRATIONS_DIR")
            .env_remove("TENANTRY_DEMO_MIGRATIONS")
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("3_lookup.sql:2: [create-index-non-concurrent]"),
        "{stdout}"
    );
    // The advice, followed: a file of its own, outside a transaction.
    std::fs::write(
        dir.path().join("3_lookup.sql"),
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_title_idx ON tasks (title);\n",
    )
    .unwrap();
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("3 migration(s), no lint findings"),
        "{stdout}"
    );
}
