//! Deletion honours `deletionPolicy`: Retain keeps schema, data and role (without LOGIN) and a
//! re-created Tenant adopts them; Delete drops both.

use sqlx::{Connection, PgConnection};
use tenantry::domain::crd::Tenant;

use crate::common::*;

async fn role_can_login(role: &str) -> Option<bool> {
    sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_optional(&pg().await)
        .await
        .unwrap()
}

async fn schema_exists(schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&pg().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_data_and_revokes_login_and_a_new_tenant_adopts_it() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("keeper")).await;
    wait_ready(&ns, "keeper").await;
    let schema = ns.schema("keeper");
    let uri = secret_value(&ns.secrets().get("keeper-db").await.unwrap(), "uri");
    let mut conn = PgConnection::connect(&uri).await.unwrap();
    sqlx::query("INSERT INTO projects (name) VALUES ('survivor')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    delete_tenant(&ns, "keeper").await;
    wait_gone(&ns, "keeper").await;
    assert!(schema_exists(&schema).await);
    assert_eq!(role_can_login(&schema).await, Some(false));
    assert!(
        ns.secrets().get_opt("keeper-db").await.unwrap().is_none(),
        "credentials of a NOLOGIN role are removed"
    );
    assert!(PgConnection::connect(&uri).await.is_err());
    assert!(events(&ns, "keeper")
        .await
        .iter()
        .any(|e| e.1 == "Retained"));

    ns.create(Tenant::test("keeper")).await;
    wait_ready(&ns, "keeper").await;
    assert_eq!(role_can_login(&schema).await, Some(true));
    let uri = secret_value(&ns.secrets().get("keeper-db").await.unwrap(), "uri");
    let mut conn = PgConnection::connect(&uri).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM projects")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "survivor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_drops_schema_and_role() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("goner").deleting()).await;
    wait_ready(&ns, "goner").await;
    let schema = ns.schema("goner");
    let uri = secret_value(&ns.secrets().get("goner-db").await.unwrap(), "uri");
    // An open session does not block the drop.
    let _session = PgConnection::connect(&uri).await.unwrap();
    assert!(schema_exists(&schema).await);

    delete_tenant(&ns, "goner").await;
    wait_gone(&ns, "goner").await;
    assert!(!schema_exists(&schema).await);
    assert_eq!(role_can_login(&schema).await, None);
    assert!(ns.secrets().get_opt("goner-db").await.unwrap().is_none());
    assert!(events(&ns, "goner").await.iter().any(|e| e.1 == "Deleted"));
}
