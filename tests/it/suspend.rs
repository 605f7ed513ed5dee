//! Suspend and resume (`spec.suspended`): within 10 s the tenant's logins fail, its sessions
//! end, the API answers 423 and no migration reaches it; resuming restores all of it. Data and
//! Secret are untouched. With a superuser admin and with a CREATEROLE-only one.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use axum::http::{Method, StatusCode};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use tenantry::{
    domain::crd::{Phase, Tenant},
    postgres::migrations::MigrationSet,
};

use crate::{
    api::{token, wait_routable, Api},
    common::*,
    hostile::{as_tenant, host_port},
};

/// What the issue allows for suspension and resumption to take effect.
const WITHIN: Duration = Duration::from_secs(10);

/// A migration set with one more migration, version 3.
fn set_with_v3() -> MigrationSet {
    let mut files = MigrationSet::embedded().to_files();
    files.push((
        "0003_suspend_probe.sql".into(),
        "CREATE TABLE suspend_probe (id int PRIMARY KEY);".into(),
    ));
    MigrationSet::from_files(files).unwrap()
}

/// An admin with CREATEROLE and CREATE on the database only, as on managed services.
pub async fn createrole_admin(ns: &TestNs) -> String {
    let pg = pg().await;
    let admin = format!("adm_{}", ns.name.replace('-', "_"));
    let password = random_suffix() + &random_suffix();
    pg.execute(
        format!(
            "CREATE ROLE \"{admin}\" LOGIN CREATEROLE PASSWORD '{password}';
             GRANT CREATE ON DATABASE tenantry TO \"{admin}\";"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let (host, port) = host_port();
    format!("postgres://{admin}:{password}@{host}:{port}/tenantry")
}

/// md5 of every row of every table of the schema, ordered by the row's text, per table.
async fn table_hashes(pg: &sqlx::PgPool, schema: &str) -> BTreeMap<String, String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pg)
    .await
    .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let h: String = sqlx::query_scalar(&format!(
            "SELECT md5(coalesce(string_agg(r::text, ',' ORDER BY r::text), '')) FROM \"{schema}\".\"{t}\" r"
        ))
        .fetch_one(pg)
        .await
        .unwrap();
        out.insert(t, h);
    }
    out
}

async fn set_suspended(ns: &TestNs, name: &str, value: serde_json::Value) {
    ns.tenants()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspended": value}})),
        )
        .await
        .unwrap();
}

async fn api_status(api: &Api, name: &str, tok: &str) -> (StatusCode, serde_json::Value) {
    let auth = format!("Bearer {tok}");
    let (s, v, _) = api
        .call(
            Method::GET,
            "/v1/tenant",
            &[("x-tenant", name), ("authorization", &auth)],
            None,
        )
        .await;
    (s, v)
}

async fn can_log_in(uri: &str) -> bool {
    PgConnection::connect(uri).await.is_ok()
}

async fn suspend_and_resume(ns: TestNs, opts: impl Fn() -> ControllerOpts) {
    let pg = pg().await;
    let ctl = RunningController::start_with(&ns, opts()).await;
    ns.create(Tenant::test("acme").deleting()).await;
    ns.create(Tenant::test("globex")).await;
    wait_ready(&ns, "acme").await;
    wait_ready(&ns, "globex").await;
    let schema = ns.schema("acme");
    let api = Api::start(&ns, Some(&ns.name)).await;
    let tok = token(&ns, "acme").await;
    wait_routable(&api, "acme", &tok).await;

    let mut session = as_tenant(&ns, "acme").await;
    session
        .execute(
            "INSERT INTO members (email, display_name) VALUES ('a@x.io', 'A'), ('b@x.io', 'B');
             INSERT INTO projects (name) VALUES ('p1');
             INSERT INTO tasks (project_id, title) SELECT id, 't1' FROM projects",
        )
        .await
        .unwrap();
    let before = table_hashes(&pg, &schema).await;
    let secret_before = ns.secrets().get("acme-db").await.unwrap();
    let uri = secret_value(&secret_before, "uri");

    // Suspend.
    let started = Instant::now();
    set_suspended(&ns, "acme", json!(true)).await;
    let (s, v) = api_status(&api, "acme", &tok).await;
    // The API follows the spec (through its watch) well within the bound.
    let mut answer = (s, v);
    while answer.0 != StatusCode::LOCKED && started.elapsed() < WITHIN {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer = api_status(&api, "acme", &tok).await;
    }
    assert_eq!(answer.0, StatusCode::LOCKED, "{:?}", answer.1);
    assert_eq!(
        answer.1["type"],
        "https://tenantry.dev/problems/tenant-suspended"
    );
    let t = wait_tenant(&ns, "acme", "phase Suspended", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Suspended)
            && t.condition("Suspended").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(t.condition("Ready").unwrap().status, "False");
    // The open session was ended, new logins fail.
    let ended = session.execute("SELECT 1").await;
    assert!(
        ended.is_err(),
        "the tenant's open session survived: {ended:?}"
    );
    assert!(!can_log_in(&uri).await, "a new login succeeded");
    let elapsed = started.elapsed();
    assert!(elapsed < WITHIN, "suspension took {elapsed:?}");
    // Neighbours are untouched.
    as_tenant(&ns, "globex")
        .await
        .execute("SELECT 1")
        .await
        .unwrap();

    // No migration reaches a suspended tenant; its neighbour gets it.
    drop(ctl);
    let ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations: set_with_v3(),
            ..opts()
        },
    )
    .await;
    wait_tenant(&ns, "globex", "globex at version 3", |t| {
        t.status.as_ref().and_then(|s| s.migration_version) == Some(3)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = ns.tenants().get("acme").await.unwrap();
    assert_eq!(t.status.as_ref().unwrap().migration_version, Some(2));
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Suspended);
    assert!(!table_hashes(&pg, &schema)
        .await
        .contains_key("suspend_probe"));
    assert_eq!(table_hashes(&pg, &schema).await, before, "data changed");
    let secret = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(secret.data, secret_before.data, "the Secret changed");
    assert_eq!(
        secret.metadata.resource_version,
        secret_before.metadata.resource_version
    );

    // Resume, by removing the field.
    let started = Instant::now();
    set_suspended(&ns, "acme", serde_json::Value::Null).await;
    let t = wait_tenant(&ns, "acme", "Ready again", |t| {
        t.is_ready()
            && t.condition("Suspended")
                .is_some_and(|c| c.status == "False")
    })
    .await;
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Ready);
    wait_routable(&api, "acme", &tok).await;
    assert!(can_log_in(&uri).await, "login still refused after resume");
    let elapsed = started.elapsed();
    assert!(elapsed < WITHIN, "resumption took {elapsed:?}");
    // The held-back migration arrives now; the data is as it was.
    wait_tenant(&ns, "acme", "acme at version 3", |t| {
        t.status.as_ref().and_then(|s| s.migration_version) == Some(3)
    })
    .await;
    // The tenant's data is as it was (the history gained the row of version 3).
    let mut after = table_hashes(&pg, &schema).await;
    assert!(after.remove("suspend_probe").is_some());
    let mut data_before = before.clone();
    for h in [&mut after, &mut data_before] {
        h.remove("tenantry_migrations");
    }
    assert_eq!(after, data_before, "data changed");
    let reasons: Vec<String> = events(&ns, "acme").await.into_iter().map(|e| e.1).collect();
    assert!(reasons.iter().any(|r| r == "Suspended"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "Resumed"), "{reasons:?}");

    // A suspended tenant can be deleted (Delete: schema and role go).
    set_suspended(&ns, "acme", json!(true)).await;
    wait_tenant(&ns, "acme", "suspended again", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Suspended)
    })
    .await;
    delete_tenant(&ns, "acme").await;
    wait_gone(&ns, "acme").await;
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = $1)
              + (SELECT count(*) FROM pg_roles WHERE rolname = $1)",
    )
    .bind(&schema)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(left, 0, "schema or role left behind");
    drop(ctl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_resume_with_a_superuser_admin() {
    let ns = TestNs::new().await;
    suspend_and_resume(ns, ControllerOpts::default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_resume_with_a_createrole_admin() {
    let ns = TestNs::new().await;
    let url = createrole_admin(&ns).await;
    suspend_and_resume(ns, move || ControllerOpts {
        database_url: url.clone(),
        ..ControllerOpts::default()
    })
    .await;
}
