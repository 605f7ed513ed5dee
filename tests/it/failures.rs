//! Bad input and bad days: invalid specs, names already taken, failing migrations and a
//! database that goes away. Each stops with a condition and an Event and changes nothing it
//! should not.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;
use tenantry::{
    domain::crd::{Phase, Tenant},
    postgres::migrations::MigrationSet,
};

use crate::common::{proxy::Proxy, *};

async fn exists(kind: &str, name: &str) -> bool {
    let sql = match kind {
        "role" => "SELECT count(*) FROM pg_roles WHERE rolname = $1",
        _ => "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
    };
    let n: i64 = sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(&pg().await)
        .await
        .unwrap();
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_get_a_condition_and_an_event_and_no_sql() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;

    ns.create(Tenant::test("reserved").with_schema("public"))
        .await;
    ns.create(Tenant::test("system").with_schema("pg_evil"))
        .await;
    // (A schema name that is not an identifier at all never gets here: the apiserver refuses
    // it, see the admission test below.)
    let long = "a".repeat(63);
    ns.create(Tenant::test(&long)).await;

    for (name, needle) in [
        ("reserved", "reserved"),
        ("system", "reserved"),
        (long.as_str(), "63 bytes"),
    ] {
        let t = wait_tenant(&ns, name, "Invalid phase", |t| {
            t.status.as_ref().is_some_and(|s| s.phase == Phase::Invalid)
        })
        .await;
        let ready = t.condition("Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(ready.message.contains(needle), "{name}: {}", ready.message);
        let evs = events(&ns, name).await;
        assert!(
            evs.iter().any(|e| e.0 == "Warning" && e.1 == "InvalidSpec"),
            "{name}: {evs:?}"
        );
    }
    // No role or schema was created under any of these names (PostgreSQL would have
    // truncated the long one to 63 bytes).
    let pg = pg().await;
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '%' OR rolname LIKE 'x\"%')
              + (SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1 || '%' OR nspname LIKE 'x\"%' OR nspname = 'pg_evil')",
    )
    .bind(format!("{}_", ns.name.replace('-', "_")))
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(
        leaked, 0,
        "an invalid Tenant must not create a role or schema"
    );
    assert!(exists("schema", "public").await);

    // Fixing the spec is what it waits for.
    let fixed_schema = format!("fixed_{}", random_suffix());
    ns.tenants()
        .patch(
            "reserved",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"schema": fixed_schema}})),
        )
        .await
        .unwrap();
    let t = wait_ready(&ns, "reserved").await;
    assert_eq!(
        t.status.unwrap().schema.as_deref(),
        Some(fixed_schema.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_is_already_taken_is_a_conflict_and_stays_untouched() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let pg = pg().await;
    let taken = format!("taken_{}", random_suffix());
    sqlx::Executor::execute(
        &pg,
        format!("CREATE SCHEMA {taken}; CREATE TABLE {taken}.precious (v text); INSERT INTO {taken}.precious VALUES ('keep me')").as_str(),
    )
    .await
    .unwrap();

    ns.create(Tenant::test("squatter").with_schema(&taken))
        .await;
    let t = wait_tenant(&ns, "squatter", "Conflict", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Conflict)
    })
    .await;
    let c = t.condition("SchemaReady").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Conflict")
    );
    assert!(
        c.message.contains("not managed by tenantry"),
        "{}",
        c.message
    );
    assert!(
        !exists("role", &taken).await,
        "no role may be created on conflict"
    );
    let v: String = sqlx::query_scalar(&format!("SELECT v FROM {taken}.precious"))
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(v, "keep me");
    assert!(events(&ns, "squatter")
        .await
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "Conflict"));

    // Two Tenants asking for the same schema: the second one is told who has it.
    let shared = format!("shared_{}", random_suffix());
    ns.create(Tenant::test("first").with_schema(&shared)).await;
    wait_ready(&ns, "first").await;
    ns.create(Tenant::test("second").with_schema(&shared)).await;
    let t = wait_tenant(&ns, "second", "Conflict", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Conflict)
    })
    .await;
    let msg = &t.condition("Ready").unwrap().message;
    assert!(
        msg.contains(&format!("belongs to Tenant {}/first", ns.name)),
        "{msg}"
    );
    // Deleting the loser (Delete policy or not) must not touch the winner's schema.
    delete_tenant(&ns, "second").await;
    wait_gone(&ns, "second").await;
    assert!(exists("schema", &shared).await && exists("role", &shared).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_stops_only_its_tenant_and_applies_nothing() {
    let ns = TestNs::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("1_widgets.sql"),
        "CREATE TABLE widgets (id int PRIMARY KEY);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("2_picky.sql"),
        "DO $$ BEGIN IF current_schema() LIKE '%bad%' THEN RAISE EXCEPTION 'refusing schema %', current_schema(); END IF; END $$;\nCREATE TABLE gadgets (id int);",
    )
    .unwrap();
    let migrations = MigrationSet::from_dir(dir.path()).unwrap();
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations,
            ..ControllerOpts::default()
        },
    )
    .await;
    ns.create(Tenant::test("good")).await;
    ns.create(Tenant::test("bad")).await;

    let good = wait_ready(&ns, "good").await;
    assert_eq!(good.status.unwrap().migration_version, Some(2));
    let bad = wait_tenant(&ns, "bad", "Failed", |t| {
        t.status.as_ref().is_some_and(|s| s.phase == Phase::Failed)
    })
    .await;
    let c = bad.condition("MigrationsApplied").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "MigrationFailed")
    );
    assert!(
        c.message.contains("migration 2 (picky) failed") && c.message.contains("refusing schema"),
        "{}",
        c.message
    );
    assert_eq!(bad.condition("CredentialsReady").unwrap().status, "Unknown");
    assert!(events(&ns, "bad")
        .await
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "MigrationFailed"));

    // One transaction per tenant: migration 1 is not half-applied either.
    let schema = ns.schema("bad");
    let widgets: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{schema}.widgets"))
        .fetch_one(&pg().await)
        .await
        .unwrap();
    assert_eq!(widgets, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_after_the_database_comes_back_and_deletion_waits_for_it() {
    let ns = TestNs::new().await;
    let url = env().database_url.clone();
    let upstream = {
        let rest = url.split('@').nth(1).unwrap();
        let hostport = rest.split('/').next().unwrap();
        hostport.parse().unwrap()
    };
    let proxy = Proxy::start(upstream).await;
    let proxied = url.replace(&upstream.to_string(), &proxy.addr.to_string());
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            database_url: proxied,
            ..ControllerOpts::default()
        },
    )
    .await;
    // Let the controller bootstrap, then cut the database off.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_up(false);
    ns.create(Tenant::test("patient").deleting()).await;
    let t = wait_tenant(&ns, "patient", "DatabaseUnavailable", |t| {
        t.condition("Ready")
            .is_some_and(|c| c.reason == "DatabaseUnavailable")
    })
    .await;
    assert_eq!(t.status.unwrap().phase, Phase::Provisioning);
    assert!(events(&ns, "patient")
        .await
        .iter()
        .any(|e| e.1 == "DatabaseUnavailable"));

    proxy.set_up(true);
    wait_ready(&ns, "patient").await;

    // Deletion while the database is away keeps the finalizer and says why.
    proxy.set_up(false);
    delete_tenant(&ns, "patient").await;
    let t = wait_tenant(&ns, "patient", "DeletionPending", |t| {
        t.condition("Ready")
            .is_some_and(|c| c.reason == "DeletionPending")
    })
    .await;
    assert_eq!(t.status.unwrap().phase, Phase::Deleting);
    assert!(exists("schema", &ns.schema("patient")).await);
    proxy.set_up(true);
    wait_gone(&ns, "patient").await;
    assert!(!exists("schema", &ns.schema("patient")).await);
    assert!(!exists("role", &ns.schema("patient")).await);
}

/// The partner is found through the routing index by the claims the mover had before: once
/// the host moves away, the Tenant still blaming it is told at once, not at its next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_shared_host_away_clears_the_partners_condition() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("stays").with_hosts(&["shop.example.com"]))
        .await;
    wait_ready(&ns, "stays").await;
    ns.create(Tenant::test("mover").with_hosts(&["shop.example.com"]))
        .await;
    let says = |status: &'static str| {
        move |t: &Tenant| t.condition("Routable").is_some_and(|c| c.status == status)
    };
    wait_tenant(&ns, "stays", "Routable=False while shared", says("False")).await;
    ns.tenants()
        .patch(
            "mover",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hosts": ["elsewhere.example.com"]}})),
        )
        .await
        .unwrap();
    wait_tenant(&ns, "mover", "Routable=True after moving", says("True")).await;
    wait_tenant(&ns, "stays", "Routable=True once alone", says("True")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_host_marks_both_tenants_unroutable_until_resolved() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("first").with_hosts(&["shop.example.com"]))
        .await;
    let t = wait_ready(&ns, "first").await;
    assert_eq!(t.condition("Routable").unwrap().status, "True");
    ns.create(Tenant::test("second").with_hosts(&["shop.example.com"]))
        .await;
    let unroutable = |t: &Tenant| t.condition("Routable").is_some_and(|c| c.status == "False");
    let second = wait_tenant(&ns, "second", "Routable=False", unroutable).await;
    let msg = &second.condition("Routable").unwrap().message;
    assert!(
        msg.contains(&format!(
            "Tenant {}/first also claims host shop.example.com",
            ns.name
        )),
        "{msg}"
    );
    assert!(
        second.is_ready(),
        "routing ambiguity does not stop provisioning"
    );
    // The first one is told as well, without waiting for its periodic resync.
    wait_tenant(
        &ns,
        "first",
        "Routable=False on the earlier Tenant",
        unroutable,
    )
    .await;
    assert!(events(&ns, "second")
        .await
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "AmbiguousRouting"));

    delete_tenant(&ns, "second").await;
    wait_tenant(&ns, "first", "Routable=True again", |t| {
        t.condition("Routable").is_some_and(|c| c.status == "True")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_after_admission_keeps_the_tenant_serving() {
    use axum::http::Method;
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let api = crate::api::Api::start(&ns, Some(&ns.name)).await;
    let schema = format!("steady_{}", random_suffix());
    ns.create(Tenant::test("steady").with_schema(&schema)).await;
    wait_ready(&ns, "steady").await;
    let auth = format!("Bearer {}", crate::api::token(&ns, "steady").await);
    crate::api::wait_routable(&api, "steady", &auth["Bearer ".len()..]).await;

    // The test apiserver (1.20) predates the CRD's `self == oldSelf` rule on spec.schema, so
    // it admits the change; the operator must refuse it without taking the tenant down.
    let moved = format!("{schema}_moved");
    let patch_schema = |to: String| {
        let tenants = ns.tenants();
        async move {
            tenants
                .patch(
                    "steady",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"schema": to}})),
                )
                .await
                .unwrap()
        }
    };
    patch_schema(moved.clone()).await;
    let t = wait_tenant(&ns, "steady", "SpecAccepted=False", |t| {
        t.condition("SpecAccepted")
            .is_some_and(|c| c.status == "False")
    })
    .await;
    let refused = t.condition("SpecAccepted").unwrap();
    assert_eq!(refused.reason, "ChangeRefused");
    assert!(
        refused.message.contains("cannot change") && refused.message.contains(&schema),
        "{}",
        refused.message
    );
    let status = t.status.as_ref().unwrap();
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.schema.as_deref(), Some(schema.as_str()));
    assert_eq!(t.condition("Ready").unwrap().status, "True");
    let evs = events(&ns, "steady").await;
    assert!(
        evs.iter()
            .any(|e| e.0 == "Warning" && e.1 == "ChangeRefused"),
        "{evs:?}"
    );
    // The API keeps routing it, to the schema it was provisioned with.
    for _ in 0..10 {
        let (s, v, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("x-tenant", "steady"), ("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(
            (s.as_u16(), v["schema"].as_str()),
            (200, Some(schema.as_str()))
        );
        let (s, _, _) = api
            .call(
                Method::GET,
                "/v1/tables/projects",
                &[("x-tenant", "steady"), ("authorization", &auth)],
                None,
            )
            .await;
        assert_eq!(s.as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No schema was created under the refused name.
    assert!(!exists("schema", &moved).await);

    // Undoing the change is accepted again: the refusal goes away.
    patch_schema(schema.clone()).await;
    wait_tenant(&ns, "steady", "SpecAccepted cleared", |t| {
        t.is_ready() && t.condition("SpecAccepted").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_refuses_malformed_names_at_admission() {
    use kube::api::PostParams;
    let ns = TestNs::new().await;
    let long = "a".repeat(64);
    for (tenant, field) in [
        (
            Tenant::test("upper").with_hosts(&["Acme.example.com"]),
            "spec.hosts",
        ),
        (
            Tenant::test("spaced").with_hosts(&["bad host.example.com"]),
            "spec.hosts",
        ),
        (
            Tenant::test("quoted").with_schema("x\"; DROP SCHEMA public; --"),
            "spec.schema",
        ),
        (Tenant::test("long").with_schema(&long), "spec.schema"),
        (
            Tenant::test("secret").with_secret_name("Bad_Name"),
            "spec.credentials.secretName",
        ),
    ] {
        let name = tenant.metadata.name.clone().unwrap();
        match ns.tenants().create(&PostParams::default(), &tenant).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{name}: {e:?}");
                assert!(e.message.contains(field), "{name}: {}", e.message);
            }
            other => panic!("{name}: admitted: {other:?}"),
        }
    }
    // Editing a live Tenant to an uppercase host is refused the same way: the Tenant never
    // sees it.
    ns.create(Tenant::test("live").with_hosts(&["live.example.com"]))
        .await;
    let err = ns
        .tenants()
        .patch(
            "live",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hosts": ["LIVE.example.com"]}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 422 && e.message.contains("spec.hosts")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_tenant_is_left_alone_until_resumed() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("frozen")).await;
    wait_ready(&ns, "frozen").await;
    let annotate = |value: Option<&str>| {
        let tenants = ns.tenants();
        let patch = json!({"metadata": {"annotations": {"tenantry.dev/paused": value}}});
        async move {
            tenants
                .patch("frozen", &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap()
        }
    };
    annotate(Some("true")).await;
    let t = wait_tenant(&ns, "frozen", "Paused=True", |t| {
        t.condition("Paused").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(t.condition("Ready").unwrap().status, "True", "still served");
    let evs = events(&ns, "frozen").await;
    assert!(
        evs.iter()
            .any(|e| e.0 == "Normal" && e.1 == "ReconcilePaused"),
        "{evs:?}"
    );

    // While paused, a deleted Secret is not repaired and a deletion waits.
    ns.secrets()
        .delete("frozen-db", &Default::default())
        .await
        .unwrap();
    ns.tenants()
        .delete("frozen", &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(ns.secrets().get_opt("frozen-db").await.unwrap().is_none());
    let t = ns.tenants().get("frozen").await.unwrap();
    assert!(t.metadata.deletion_timestamp.is_some());
    assert!(exists("schema", &ns.schema("frozen")).await);

    // Resumed: the deletion goes ahead.
    annotate(None).await;
    wait_gone(&ns, "frozen").await;
}
