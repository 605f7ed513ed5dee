//! Schema drift detection: a schema changed by hand is named on its Tenant within the scan
//! interval, its neighbours stay clean, a revert clears it, and a tenant locking its own
//! tables does not stop the fleet's scan.

use std::time::Duration;

use sqlx::{Executor, PgPool};
use tenantry::{
    domain::crd::{condition, Tenant},
    postgres::migrations::MigrationSet,
};

use crate::{
    common::*,
    hostile::{as_tenant, sqlstate},
    suspend::createrole_admin,
};

const INTERVAL: Duration = Duration::from_secs(2);

fn drift_opts() -> ControllerOpts {
    ControllerOpts {
        drift_interval: INTERVAL,
        ..ControllerOpts::default()
    }
}

/// The SchemaDrift condition of `t`: (status, reason, message).
fn drift_of(t: &Tenant) -> Option<(String, String, String)> {
    t.condition(condition::SCHEMA_DRIFT)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_drift(
    ns: &TestNs,
    name: &str,
    what: &str,
    pred: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
) -> Tenant {
    wait_tenant(ns, name, what, move |t| {
        drift_of(t).is_some_and(|(s, _, m)| pred(&s, &m))
    })
    .await
}

/// What a database administrator does by hand: DDL as the tenant's owner role, in its schema.
async fn by_hand(pg: &PgPool, schema: &str, sql: &str) {
    pg.execute(
        format!(
            "BEGIN; SET LOCAL ROLE \"{schema}_owner\"; SET LOCAL search_path TO \"{schema}\"; \
             {sql}; COMMIT"
        )
        .as_str(),
    )
    .await
    .unwrap();
}

/// The scratch tenants (`tenantry$ref_*`) in the database: schemas and roles.
async fn scratch_names(pg: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, 'tenantry$ref_')
         UNION SELECT rolname::text FROM pg_roles WHERE starts_with(rolname::text, 'tenantry$ref_')
         ORDER BY 1",
    )
    .fetch_all(pg)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_made_change_is_named_on_its_tenant_and_clears_when_reverted() {
    let pg = pg().await;
    // A scratch tenant a crashed operator left long ago (marked as the operator's), and a
    // schema of that shape someone else made (unmarked): the first goes, the second stays.
    let hex = |s: String| s.replace(|c: char| !c.is_ascii_hexdigit(), "0");
    let left = format!("tenantry$ref_dead{}", hex(random_suffix()));
    let foreign = format!("tenantry$ref_cafe{}", hex(random_suffix()));
    let mark = r#"{"managedBy":"tenantry","namespace":"","name":"schema-drift-reference","uid":"00000000@1"}"#;
    pg.execute(
        format!(
            "CREATE ROLE \"{left}_owner\" NOLOGIN; COMMENT ON ROLE \"{left}_owner\" IS '{mark}';
             CREATE SCHEMA \"{left}\"; COMMENT ON SCHEMA \"{left}\" IS '{mark}';
             CREATE SCHEMA \"{foreign}\""
        )
        .as_str(),
    )
    .await
    .unwrap();

    let ns = TestNs::new().await;
    let ctl = RunningController::start_with(&ns, drift_opts()).await;
    for n in ["acme", "globex", "initech"] {
        ns.create(Tenant::test(n)).await;
    }
    for n in ["acme", "globex", "initech"] {
        wait_ready(&ns, n).await;
        let t = wait_drift(&ns, n, "SchemaDrift=False", |s, _| s == "False").await;
        let (_, reason, message) = drift_of(&t).unwrap();
        assert_eq!(reason, "MatchesVersion");
        assert_eq!(message, "the schema matches migration version 2");
    }
    // The references were built and dropped; the stale scratch tenant went with the first
    // build; the unmarked schema stays.
    let (p, f) = (pg.clone(), foreign.clone());
    eventually(
        "no scratch tenant left",
        Duration::from_secs(30),
        move || {
            let (p, f) = (p.clone(), f.clone());
            async move { (scratch_names(&p).await == [f]).then_some(()) }
        },
    )
    .await;
    pg.execute(format!("DROP SCHEMA \"{foreign}\"").as_str())
        .await
        .unwrap();

    // The tenant's own credentials cannot change its schema (the app login has no DDL).
    let acme = ns.schema("acme");
    let mut tenant = as_tenant(&ns, "acme").await;
    assert_eq!(
        sqlstate(
            tenant
                .execute("ALTER TABLE tasks ADD COLUMN priority integer")
                .await
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(
            tenant
                .execute("CREATE INDEX tasks_title_idx ON tasks (title)")
                .await
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(tenant.execute("DROP TABLE members CASCADE").await),
        "42501"
    );
    drop(tenant);

    // An administrator's hotfixes, by hand.
    by_hand(
        &pg,
        &acme,
        "ALTER TABLE tasks ADD COLUMN priority integer; \
         CREATE INDEX tasks_title_idx ON tasks (title); \
         ALTER TABLE projects ALTER COLUMN description TYPE varchar(10)",
    )
    .await;
    let initech = ns.schema("initech");
    by_hand(&pg, &initech, "DROP TABLE members CASCADE").await;

    let t = wait_drift(&ns, "acme", "acme drifted", |s, _| s == "True").await;
    let (_, reason, message) = drift_of(&t).unwrap();
    assert_eq!(reason, "Drifted");
    assert_eq!(
        message,
        "the schema differs from migration version 2: \
         column projects.description: type character varying(10), expected text; \
         column tasks.priority: not in migration version 2; \
         index tasks_title_idx: not in migration version 2"
    );
    assert!(t.is_ready(), "drift is a report: the tenant stays Ready");
    let t = wait_drift(&ns, "initech", "initech drifted", |s, _| s == "True").await;
    let (_, _, message) = drift_of(&t).unwrap();
    assert_eq!(
        message,
        "the schema differs from migration version 2: table members: missing; \
         constraint tasks.tasks_assignee_id_fkey: missing",
        "the missing table's columns, constraints and indexes are not listed again"
    );
    // The neighbour stays clean, scan after scan.
    tokio::time::sleep(INTERVAL * 2).await;
    let g = ns.tenants().get("globex").await.unwrap();
    assert_eq!(drift_of(&g).unwrap().0, "False");
    let ev = events(&ns, "acme").await;
    assert!(
        ev.iter().any(|(ty, r, n)| ty == "Warning"
            && r == "SchemaDriftDetected"
            && n.contains("index tasks_title_idx")),
        "{ev:?}"
    );
    let metrics = ctl.metrics.encode();
    assert!(
        metrics.contains("tenantry_schema_drift_tenants 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("drift"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Reverted: clean again, with a Normal Event.
    by_hand(
        &pg,
        &acme,
        "DROP INDEX tasks_title_idx; ALTER TABLE tasks DROP COLUMN priority; \
         ALTER TABLE projects ALTER COLUMN description TYPE text",
    )
    .await;
    wait_drift(&ns, "acme", "acme clean again", |s, _| s == "False").await;
    let ev = events(&ns, "acme").await;
    assert!(
        ev.iter()
            .any(|(ty, r, _)| ty == "Normal" && r == "SchemaDriftResolved"),
        "{ev:?}"
    );
}

/// A tenant holds ACCESS EXCLUSIVE on its own table (its credentials may, as the table's
/// writer) so that deparsing its definitions waits: the rest of the fleet is still scanned
/// within the interval, and that tenant is not reported as drifted for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_locking_its_tables_does_not_stop_the_drift_scan() {
    let pg = pg().await;
    let ns = TestNs::new().await;
    let _ctl = RunningController::start_with(&ns, drift_opts()).await;
    ns.create(Tenant::test("acme")).await;
    ns.create(Tenant::test("globex")).await;
    for n in ["acme", "globex"] {
        wait_ready(&ns, n).await;
        wait_drift(&ns, n, "SchemaDrift=False", |s, _| s == "False").await;
    }
    let mut locker = as_tenant(&ns, "acme").await;
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute("LOCK TABLE projects IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    by_hand(
        &pg,
        &ns.schema("globex"),
        "CREATE INDEX projects_created_idx ON projects (created_at)",
    )
    .await;
    let t = wait_drift(&ns, "globex", "globex drifted", |s, m| {
        s == "True" && m.contains("index projects_created_idx: not in migration version 2")
    })
    .await;
    assert!(t.is_ready());
    // Within a few intervals: the locked tenant costs the scan no more than a skip.
    assert!(
        started.elapsed() < INTERVAL * 5 + Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let a = ns.tenants().get("acme").await.unwrap();
    assert_eq!(
        drift_of(&a).unwrap().0,
        "False",
        "a locked tenant is skipped, not drifted"
    );
    locker.execute("COMMIT").await.unwrap();
}

/// Normalisation: schemas made by the same migrations fingerprint alike whatever their name —
/// one that needs quoting, a keyword — with sequences, an enum of the schema's own, a
/// foreign key, a check and a partial expression index, and a partitioned table; with an admin
/// that has CREATEROLE only (the references are built and dropped with the same rights).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_made_by_the_same_migrations_match_whatever_their_name() {
    let ns = TestNs::new().await;
    let set = MigrationSet::from_files([
        (
            "1_kinds.sql".to_string(),
            "CREATE TYPE mood AS ENUM ('ok', 'meh');
             CREATE TABLE notes (
                 id serial PRIMARY KEY,
                 body text NOT NULL DEFAULT 'notes.body',
                 mood mood NOT NULL DEFAULT 'ok',
                 parent integer REFERENCES notes (id),
                 CHECK (mood <> 'meh' OR body <> '')
             );
             CREATE INDEX notes_body_idx ON notes (lower(body)) WHERE mood = 'ok';"
                .to_string(),
        ),
        (
            "2_events.sql".to_string(),
            "CREATE TABLE events (at timestamptz NOT NULL, kind text) PARTITION BY RANGE (at);
             CREATE TABLE events_2026 PARTITION OF events
                 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             CREATE INDEX events_kind_idx ON events (kind);"
                .to_string(),
        ),
    ])
    .unwrap();
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            database_url: createrole_admin(&ns).await,
            migrations: set,
            ..drift_opts()
        },
    )
    .await;
    let keyword = format!("select_{}", random_suffix());
    ns.create(Tenant::test("acme")).await;
    ns.create(Tenant::test("globex").with_schema(&keyword))
        .await;
    for n in ["acme", "globex"] {
        wait_ready(&ns, n).await;
        let t = wait_drift(&ns, n, "SchemaDrift", |_, _| true).await;
        assert_eq!(
            drift_of(&t).unwrap(),
            (
                "False".to_string(),
                "MatchesVersion".to_string(),
                "the schema matches migration version 2".to_string()
            )
        );
    }
    // A change to a partition is found too.
    let pg = pg().await;
    pg.execute(
        format!(
            "BEGIN; SET LOCAL ROLE \"{keyword}_owner\"; \
             ALTER TABLE \"{keyword}\".events_2026 ADD CONSTRAINT kind_set CHECK (kind IS NOT NULL); \
             COMMIT"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let t = wait_drift(&ns, "globex", "globex drifted", |s, _| s == "True").await;
    assert_eq!(
        drift_of(&t).unwrap().2,
        "the schema differs from migration version 2: \
         constraint events_2026.kind_set: not in migration version 2"
    );
}
