//! The hostile tenant: each test plays one attack with a tenant's real credentials (the `uri`
//! of its Secret) against the real PostgreSQL, operator and API, and checks that it fails
//! without a side effect. The invariant under test: no session whose session user can act for
//! more than one tenant ever evaluates an object a tenant credential could have created.

mod api;
mod operator;

use sqlx::{Connection, PgConnection};

use tenantry::domain::crd::Tenant;

use crate::common::*;

/// Host and port of the test PostgreSQL.
pub fn host_port() -> (String, u16) {
    let opts: sqlx::postgres::PgConnectOptions = env().database_url.parse().unwrap();
    (opts.get_host().to_string(), opts.get_port())
}

/// A session logged in with the tenant's own Secret.
pub async fn as_tenant(ns: &TestNs, name: &str) -> PgConnection {
    let s = ns.secrets().get(&format!("{name}-db")).await.unwrap();
    PgConnection::connect(&secret_value(&s, "uri"))
        .await
        .expect("tenant login")
}

/// The SQLSTATE of a failed statement (panics when it succeeded).
#[track_caller]
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, sqlx::Error>) -> String {
    match r {
        Err(sqlx::Error::Database(e)) => e.code().unwrap_or_default().into_owned(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

pub async fn is_superuser(pg: &sqlx::PgPool, role: &str) -> bool {
    sqlx::query_scalar(
        "SELECT rolsuper OR rolcreaterole OR rolbypassrls FROM pg_roles WHERE rolname = $1",
    )
    .bind(role)
    .fetch_one(pg)
    .await
    .unwrap()
}

pub async fn two_tenants(ns: &TestNs) {
    ns.create(Tenant::test("acme")).await;
    ns.create(Tenant::test("globex")).await;
    wait_ready(ns, "acme").await;
    wait_ready(ns, "globex").await;
}
