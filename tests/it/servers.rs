//! Several PostgreSQL servers: PostgresServers registered from admin Secrets, tenants spread
//! over them and over the default server, placement by name, labels and capacity, nothing
//! created while no server can take a tenant, a server down costing only its own tenants, the
//! upgrade of tenants provisioned before servers were recorded, and the API serving each
//! tenant over its own server's pool.

use std::{collections::BTreeMap, time::Duration};

use axum::http::Method;
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    Api as KubeApi,
};
use serde_json::json;
use sqlx::PgPool;
use tenantry::domain::{
    crd::{Phase, Tenant},
    server::{LabelSelector, PlacementSpec, PostgresServer, PostgresServerSpec, SecretKeyRef},
};

use crate::{
    api::{gateway_uri, token, wait_routable, Api},
    common::*,
};

/// A started server, registered as PostgresServer `name`.
struct Registered {
    name: String,
    server: Server,
    /// Its superuser, for the assertions.
    pg: PgPool,
}

/// Starts a PostgreSQL server and registers it: its admin Secret (the superuser, or a
/// CREATEROLE-only owner of the database under `TENANTRY_TEST_ADMIN=createrole`, as for the
/// default server) and a PostgresServer labelled for this test's controller.
async fn register(
    ns: &TestNs,
    name: &str,
    labels: &[(&str, &str)],
    capacity: Option<u32>,
) -> Registered {
    let server = tokio::task::spawn_blocking({
        let name = name.to_string();
        move || Server::start(&name)
    })
    .await
    .unwrap();
    let admin = if admin_role().is_some() {
        createrole_owner(&server.url).await
    } else {
        server.url.clone()
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(format!("{name}-admin")),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "uri".to_string(),
            ByteString(admin.into_bytes()),
        )])),
        ..Secret::default()
    };
    ns.secrets()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut all: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(SERVER_LABEL.into(), ns.name.clone());
    let ps = PostgresServer {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(all),
            ..ObjectMeta::default()
        },
        spec: PostgresServerSpec {
            admin_secret_ref: SecretKeyRef {
                name: format!("{name}-admin"),
                key: None,
            },
            capacity,
            ..PostgresServerSpec::default()
        },
        status: None,
    };
    servers(ns)
        .create(&PostParams::default(), &ps)
        .await
        .unwrap();
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url)
        .await
        .unwrap();
    Registered {
        name: name.to_string(),
        server,
        pg,
    }
}

fn servers(ns: &TestNs) -> KubeApi<PostgresServer> {
    KubeApi::all(ns.client.clone())
}

/// Waits until PostgresServer `name`'s Ready condition has `status`.
async fn wait_server(ns: &TestNs, name: &str, status: &'static str) -> PostgresServer {
    let api = servers(ns);
    let name = name.to_string();
    eventually(
        "the PostgresServer's Ready condition",
        Duration::from_secs(60),
        move || {
            let api = api.clone();
            let name = name.clone();
            async move {
                api.get_opt(&name).await.ok().flatten().filter(|s| {
                    s.status.as_ref().is_some_and(|st| {
                        st.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == status)
                    })
                })
            }
        },
    )
    .await
}

async fn schema_on(pg: &PgPool, schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn role_on(pg: &PgPool, role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(pg)
        .await
        .unwrap()
}

fn placed(t: &Tenant) -> Option<String> {
    t.status.as_ref().and_then(|s| s.server.clone())
}

fn with_placement(mut t: Tenant, server: Option<&str>, labels: &[(&str, &str)]) -> Tenant {
    t.spec.placement = Some(PlacementSpec {
        server: server.map(str::to_string),
        selector: (!labels.is_empty()).then(|| LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: None,
        }),
    });
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_spread_over_servers_and_each_lives_on_its_own() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start(&ns).await;
    let s2_name = format!("{}-s2", ns.name);
    let s3_name = format!("{}-s3", ns.name);
    let (s2, s3) = tokio::join!(
        register(&ns, &s2_name, &[("tier", "shared")], None),
        register(&ns, &s3_name, &[("tier", "dedicated")], None),
    );
    for s in [&s2, &s3] {
        let ps = wait_server(&ns, &s.name, "True").await;
        let st = ps.status.unwrap();
        assert!(st.reachable && st.version.is_some() && st.bytes_used.unwrap() > 0);
        let ep = st.endpoint.unwrap();
        assert_eq!(ep.dbname, "tenantry");
        assert!(s.server.url.contains(&format!(":{}/", ep.port)), "{ep:?}");
    }
    let default_pg = pg().await;
    let on = |server: &str| -> PgPool {
        if server == s2.name {
            s2.pg.clone()
        } else if server == s3.name {
            s3.pg.clone()
        } else {
            assert_eq!(server, "default");
            default_pg.clone()
        }
    };

    // 30 tenants created at once land evenly on the three servers (within ±10 %).
    let names: Vec<String> = (0..30).map(|i| format!("t{i:02}")).collect();
    futures::future::join_all(names.iter().map(|n| ns.create(Tenant::test(n)))).await;
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut where_: BTreeMap<String, String> = BTreeMap::new();
    for n in &names {
        let t = wait_ready(&ns, n).await;
        let server = placed(&t).expect("status.server");
        assert_eq!(
            t.condition("Placed").map(|c| c.status.as_str()),
            Some("True")
        );
        *count.entry(server.clone()).or_default() += 1;
        where_.insert(n.clone(), server);
    }
    assert_eq!(count.len(), 3, "{count:?}");
    for (server, n) in &count {
        assert!((9..=11).contains(n), "{server}: {n} tenants ({count:?})");
    }
    // Each schema and role exists on its own server and on no other.
    for (n, server) in &where_ {
        let schema = ns.schema(n);
        for other in ["default", s2.name.as_str(), s3.name.as_str()] {
            let pg = on(other);
            assert_eq!(
                schema_on(&pg, &schema).await,
                other == server,
                "{n} on {other}"
            );
            assert_eq!(
                role_on(&pg, &schema).await,
                other == server,
                "{n} on {other}"
            );
        }
    }
    // The PostgresServer counts its tenants.
    let s3_count = count[&s3.name] as u32;
    let api = servers(&ns);
    let s3_name2 = s3.name.clone();
    eventually("the tenant count", Duration::from_secs(30), move || {
        let api = api.clone();
        let name = s3_name2.clone();
        async move {
            api.get(&name)
                .await
                .ok()
                .filter(|s| s.status.as_ref().is_some_and(|st| st.tenants == s3_count))
        }
    })
    .await;

    // A tenant's Secret points at its server and works there.
    let (on_s3, _) = where_.iter().find(|(_, s)| **s == s3.name).unwrap();
    let secret = ns.secrets().get(&format!("{on_s3}-db")).await.unwrap();
    assert!(s3
        .server
        .url
        .contains(&format!(":{}/", secret_value(&secret, "port"))));
    let mut login =
        <sqlx::PgConnection as sqlx::Connection>::connect(&secret_value(&secret, "uri"))
            .await
            .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&mut login)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Placement by name and by labels.
    ns.create(with_placement(Tenant::test("named"), Some(&s3.name), &[]))
        .await;
    ns.create(with_placement(
        Tenant::test("shared"),
        None,
        &[("tier", "shared")],
    ))
    .await;
    assert_eq!(
        placed(&wait_ready(&ns, "named").await),
        Some(s3.name.clone())
    );
    assert_eq!(
        placed(&wait_ready(&ns, "shared").await),
        Some(s2.name.clone())
    );

    // A placement changed later moves nothing: reported, and the tenant keeps serving.
    ns.tenants()
        .patch(
            "named",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"placement": {"server": s2.name}}})),
        )
        .await
        .unwrap();
    let named = wait_tenant(&ns, "named", "Placed=False", |t| {
        t.condition("Placed").is_some_and(|c| c.status == "False")
    })
    .await;
    let c = named.condition("Placed").unwrap();
    assert_eq!(c.reason, "PlacementChanged", "{c:?}");
    assert!(c.message.contains(&s3.name), "{}", c.message);
    assert_eq!(placed(&named), Some(s3.name.clone()));
    assert_eq!(named.condition("Ready").unwrap().status, "True");

    // A server nobody registered: a clear condition, nothing created anywhere.
    ns.create(with_placement(Tenant::test("lost"), Some("nowhere"), &[]))
        .await;
    let lost = wait_tenant(&ns, "lost", "Placed=False", |t| {
        t.condition("Placed").is_some_and(|c| c.status == "False")
    })
    .await;
    let c = lost.condition("Placed").unwrap();
    assert_eq!(c.reason, "ServerNotFound", "{c:?}");
    assert!(c.message.contains("\"nowhere\""), "{}", c.message);
    assert_eq!(placed(&lost), None);
    assert_eq!(lost.condition("Ready").unwrap().status, "False");
    let lost_schema = ns.schema("lost");
    for pg in [&default_pg, &s2.pg, &s3.pg] {
        assert!(!role_on(pg, &lost_schema).await && !schema_on(pg, &lost_schema).await);
    }
    assert!(
        events(&ns, "lost")
            .await
            .iter()
            .any(|(kind, reason, _)| kind == "Warning" && reason == "NoServer"),
        "{:?}",
        events(&ns, "lost").await
    );

    // A schema name is one tenant's across servers: a Tenant claiming another's is refused
    // before it is placed, whatever server it asks for.
    let (taken_by, taken_on) = where_.iter().find(|(_, s)| **s == s2.name).unwrap();
    let mut dup = with_placement(Tenant::test("dup"), Some(&s3.name), &[]);
    dup.spec.schema = Some(ns.schema(taken_by));
    ns.create(dup).await;
    let dup = wait_tenant(&ns, "dup", "Conflict", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Conflict)
    })
    .await;
    let ready = dup.condition("Ready").unwrap();
    assert!(
        ready.message.contains(&format!("{}/{taken_by}", ns.name))
            && ready.message.contains(taken_on.as_str()),
        "{ready:?}"
    );
    assert_eq!(placed(&dup), None);
    assert!(!schema_on(&s3.pg, &ns.schema(taken_by)).await);

    // Each server's gateway role has its own password: the default server's opens no other.
    let gateway = gateway_uri(&ns).await;
    let port = |url: &str| {
        url.rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let on_s2 = gateway.replace(
        &format!(":{}/", port(&gateway)),
        &format!(":{}/", port(&s2.server.url)),
    );
    let refused = <sqlx::PgConnection as sqlx::Connection>::connect(&on_s2).await;
    assert!(
        refused
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .as_deref()
            == Some("28P01"),
        "the default server's gateway password logs in on another server: {:?}",
        refused.map(|_| ())
    );

    // A full server is skipped: with none left, nothing is created until there is room.
    let s2_now = count[&s2.name] as u32 + 1;
    servers(&ns)
        .patch(
            &s2.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": s2_now}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await; // a refresh of the servers
    ns.create(with_placement(
        Tenant::test("full"),
        None,
        &[("tier", "shared")],
    ))
    .await;
    let full = wait_tenant(&ns, "full", "Placed=False", |t| {
        t.condition("Placed").is_some_and(|c| c.status == "False")
    })
    .await;
    let c = full.condition("Placed").unwrap();
    assert_eq!(c.reason, "NoEligibleServer", "{c:?}");
    assert!(
        c.message
            .contains(&format!("{} is full ({s2_now} of {s2_now})", s2.name)),
        "{}",
        c.message
    );
    assert!(!role_on(&s2.pg, &ns.schema("full")).await);
    servers(&ns)
        .patch(
            &s2.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": s2_now + 1}})),
        )
        .await
        .unwrap();
    let full = wait_tenant(&ns, "full", "Ready after room was made", |t| {
        t.condition("Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(placed(&full), Some(s2.name.clone()));

    // The API serves every tenant over its own server's pool...
    let api = Api::start_with_servers(&ns, 8).await;
    for (n, server) in where_.iter().take(6).chain([
        (&"named".to_string(), &s3.name),
        (&"shared".to_string(), &s2.name),
    ]) {
        let tok = token(&ns, n).await;
        wait_routable(&api, n, &tok).await;
        let auth = format!("Bearer {tok}");
        let h = [("x-tenant", n.as_str()), ("authorization", auth.as_str())];
        let (s, v, _) = api
            .call(
                Method::POST,
                "/v1/tables/projects",
                &h,
                Some(json!({"name": format!("{n} on {server}")})),
            )
            .await;
        assert_eq!(s, 201, "{n}: {v}");
        let (s, v, _) = api.call(Method::GET, "/v1/tables/projects", &h, None).await;
        assert_eq!(s, 200, "{n}: {v}");
        assert_eq!(v.as_array().unwrap().len(), 1, "{n}: {v}");
        let stored: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".projects",
            ns.schema(n)
        ))
        .fetch_one(&on(server))
        .await
        .unwrap();
        assert_eq!(stored, 1, "{n} stored on {server}");
    }
    // One pool per server, each in the metrics.
    let (_, metrics) = api.scrape().await;
    for server in ["default", s2.name.as_str(), s3.name.as_str()] {
        assert!(
            metrics.contains(&format!(
                "tenantry_api_pool_connections{{state=\"idle\",server=\"{server}\"}}"
            )),
            "{metrics}"
        );
    }
    // ...and an API for its own server only refuses the others' tenants.
    let own_only = Api::start(&ns, Some(&ns.name)).await;
    let tok = token(&ns, "named").await;
    let auth = format!("Bearer {tok}");
    let h = [("x-tenant", "named"), ("authorization", auth.as_str())];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (s, v) = loop {
        let (s, v, _) = own_only
            .call(Method::GET, "/v1/tables/projects", &h, None)
            .await;
        // Until its registry has the Tenant.
        if s != 404 || std::time::Instant::now() > deadline {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s, 503, "{v}");
    assert_eq!(
        v["type"],
        "https://tenantry.dev/problems/tenant-on-another-server"
    );

    // A server down: it says so; new tenants go elsewhere; the others are unaffected.
    tokio::task::block_in_place(|| s3.server.stop());
    let down = wait_server(&ns, &s3.name, "False").await;
    let c = down.status.unwrap().conditions.remove(0);
    assert_eq!(c.reason, "Unreachable", "{c:?}");
    ns.create(Tenant::test("while-down")).await;
    let t = wait_ready(&ns, "while-down").await;
    assert_ne!(placed(&t), Some(s3.name.clone()));
    let (s, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/projects",
            &[
                ("x-tenant", "shared"),
                (
                    "authorization",
                    &format!("Bearer {}", token(&ns, "shared").await),
                ),
            ],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = api.call(Method::GET, "/v1/tables/projects", &h, None).await;
    assert_eq!(s, 503, "a tenant of the server that is down: {v}");
    tokio::task::block_in_place(|| s3.server.start_again());
    wait_server(&ns, &s3.name, "True").await;

    // Deleting a tenant drops its schema on its own server.
    let (on_s3, _) = where_.iter().find(|(_, s)| **s == s3.name).unwrap();
    ns.tenants()
        .patch(
            on_s3,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
        )
        .await
        .unwrap();
    wait_tenant(&ns, on_s3, "the Delete policy applied", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.observed_generation == t.metadata.generation)
    })
    .await;
    delete_tenant(&ns, on_s3).await;
    wait_gone(&ns, on_s3).await;
    assert!(!schema_on(&s3.pg, &ns.schema(on_s3)).await);
    assert!(!role_on(&s3.pg, &ns.schema(on_s3)).await);

    // Upgrade: a tenant provisioned before servers were recorded (no status.server) lives on
    // the default server and gets it recorded.
    drop(ctl);
    let (old, _) = where_.iter().find(|(_, s)| *s == "default").unwrap();
    ns.tenants()
        .patch_status(
            old,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"server": null}})),
        )
        .await
        .unwrap();
    assert_eq!(placed(&ns.tenants().get(old).await.unwrap()), None);
    let _ctl = RunningController::start(&ns).await;
    let t = wait_tenant(&ns, old, "status.server recorded", |t| {
        placed(t).as_deref() == Some("default")
    })
    .await;
    assert_eq!(t.condition("Ready").unwrap().status, "True");
    assert_eq!(
        t.condition("Placed").map(|c| c.reason.as_str()),
        Some("Placed")
    );
}
