//! Provisioning: a Tenant becomes a migrated schema owned by its role, with working
//! credentials that reach nothing else; re-reconciling changes nothing; a lost or tampered
//! Secret is repaired.

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};
use tenantry::domain::crd::{Phase, Tenant};

use kube::ResourceExt;

use crate::common::*;

async fn login(uri: &str) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(uri).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_gets_schema_role_tables_and_working_isolated_credentials() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_hosts(&["acme.example.com"]))
        .await;
    ns.create(Tenant::test("globex")).await;
    let acme = wait_ready(&ns, "acme").await;
    wait_ready(&ns, "globex").await;

    let schema = ns.schema("acme");
    let status = acme.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.schema.as_deref(), Some(schema.as_str()));
    assert_eq!(status.role.as_deref(), Some(schema.as_str()));
    assert_eq!(status.secret_name.as_deref(), Some("acme-db"));
    assert_eq!(status.migration_version, Some(2));
    for c in [
        "RoleReady",
        "SchemaReady",
        "MigrationsApplied",
        "CredentialsReady",
        "Ready",
    ] {
        assert_eq!(
            acme.condition(c).map(|c| c.status.as_str()),
            Some("True"),
            "{c}"
        );
    }
    assert!(acme
        .finalizers()
        .contains(&"tenantry.dev/cleanup".to_string()));

    // The schema belongs to the role and holds the default migration set.
    let pg = pg().await;
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(&schema)
    .fetch_one(&pg)
    .await
    .unwrap();
    // The schema and everything in it belong to the owner role; the login role (the Secret's
    // username) only uses the data.
    let owner_role = format!("{schema}_owner");
    assert_eq!(owner, owner_role);
    assert_eq!(status.owner_role.as_deref(), Some(owner_role.as_str()));
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT tablename::text, tableowner::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&pg)
    .await
    .unwrap();
    let names: Vec<_> = tables.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        ["members", "projects", "tasks", "tenantry_migrations"]
    );
    assert!(
        tables.iter().all(|t| t.1 == owner_role),
        "tables owned by the owner role: {tables:?}"
    );

    // The Secret carries every key, is owned by the Tenant, and its URI logs in.
    let secret = ns.secrets().get("acme-db").await.unwrap();
    for k in [
        "host", "port", "dbname", "username", "password", "schema", "uri", "jdbc-uri",
    ] {
        assert!(!secret_value(&secret, k).is_empty(), "{k}");
    }
    assert!(secret_value(&secret, "password").len() >= 32);
    let owner_ref = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner_ref.kind.as_str(), owner_ref.name.as_str()),
        ("Tenant", "acme")
    );
    assert_eq!(owner_ref.controller, Some(true));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["tenantry.dev/tenant"],
        "acme"
    );

    let mut conn = login(&secret_value(&secret, "uri"))
        .await
        .expect("login with the Secret's uri");
    let (user, current_schema): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_schema()::text")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (user.as_str(), current_schema.as_str()),
        (schema.as_str(), schema.as_str())
    );
    let project_id: i64 =
        sqlx::query_scalar("INSERT INTO projects (name) VALUES ($1) RETURNING id")
            .bind("launch")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::query("INSERT INTO tasks (project_id, title) VALUES ($1, $2)")
        .bind(project_id)
        .bind("write docs")
        .execute(&mut conn)
        .await
        .unwrap();
    let title: String = sqlx::query_scalar("SELECT t.title FROM tasks t JOIN projects p ON p.id = t.project_id WHERE p.name = 'launch'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(title, "write docs");

    // Nothing else is reachable: not the other tenant's tables, not its role, not public.
    let other = ns.schema("globex");
    for sql in [
        format!("SELECT * FROM \"{other}\".projects"),
        format!("INSERT INTO \"{other}\".projects (name) VALUES ('x')"),
        format!("SET ROLE \"{other}\""),
        "CREATE TABLE public.leak (id int)".to_string(),
        format!("CREATE TABLE \"{other}\".leak (id int)"),
    ] {
        let err = sqlx::Executor::execute(&mut conn, sql.as_str())
            .await
            .expect_err(&format!("{sql} must fail"));
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    let globex_rows: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{other}\".projects"))
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(globex_rows, 0);

    // kubectl shows the printer columns.
    let out = kubectl_ok(&["get", "tenants", "-n", &ns.name, "-o", "wide"]);
    let header = out.lines().next().unwrap();
    for col in [
        "READY",
        "PHASE",
        "SCHEMA",
        "MIGRATION",
        "HOSTS",
        "SECRET",
        "MESSAGE",
        "AGE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        out.contains("acme.example.com") && out.contains(&schema),
        "{out}"
    );
    assert!(out.contains("ready with credentials in Secret"), "{out}");

    // One Event tells the whole provisioning story.
    let evs = events(&ns, "acme").await;
    let provisioned: Vec<_> = evs.iter().filter(|e| e.1 == "Provisioned").collect();
    assert_eq!(provisioned.len(), 1, "{evs:?}");
    for step in [
        "created role",
        "created schema",
        "applied migrations 1, 2",
        "issued Secret acme-db",
    ] {
        assert!(
            provisioned[0].2.contains(step),
            "{step} missing from {:?}",
            provisioned[0].2
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_a_ready_tenant_again_changes_nothing() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("steady")).await;
    wait_ready(&ns, "steady").await;
    let schema = ns.schema("steady");
    let pg = pg().await;
    let catalog_versions = || {
        let pg = pg.clone();
        let schema = schema.clone();
        async move {
            sqlx::query(
                "SELECT (SELECT xmin::text FROM pg_authid WHERE rolname = $1),
                        (SELECT xmin::text FROM pg_namespace WHERE nspname = $1),
                        (SELECT count(*) FROM pg_description d JOIN pg_namespace n ON d.objoid = n.oid WHERE n.nspname = $1)",
            )
            .bind(&schema)
            .fetch_one(&pg)
            .await
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1), r.get::<i64, _>(2)))
            .unwrap()
        }
    };
    // Let any follow-up reconcile (triggered by our own status and Secret writes) finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_catalog = catalog_versions().await;
    let secret_rv = ns
        .secrets()
        .get("steady-db")
        .await
        .unwrap()
        .metadata
        .resource_version;

    // Any change to the object triggers a reconcile; an annotation does not touch the spec.
    let patched = ns
        .tenants()
        .patch(
            "steady",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": "1"}}})),
        )
        .await
        .unwrap();
    let tenant_rv = patched.metadata.resource_version.clone();
    let count = ctl.metrics.reconciliations();
    let m = ctl.metrics.clone();
    eventually("another reconcile", Duration::from_secs(20), move || {
        let m = m.clone();
        async move { (m.reconciliations() > count).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        catalog_versions().await,
        before_catalog,
        "role or schema rewritten"
    );
    let after = ns.secrets().get("steady-db").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, secret_rv,
        "Secret rewritten"
    );
    let tenant = ns.tenants().get("steady").await.unwrap();
    assert_eq!(
        tenant.metadata.resource_version, tenant_rv,
        "status rewritten"
    );
    let applied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".tenantry_migrations"
    ))
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(applied, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_tampered_secret_is_repaired_with_a_new_password() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("fixme")).await;
    wait_ready(&ns, "fixme").await;
    let original = ns.secrets().get("fixme-db").await.unwrap();
    let old_uri = secret_value(&original, "uri");
    let old_uid = original.metadata.uid.clone();

    ns.secrets()
        .delete("fixme-db", &DeleteParams::default())
        .await
        .unwrap();
    let secrets = ns.secrets();
    let repaired = eventually("Secret recreated", Duration::from_secs(30), move || {
        let secrets = secrets.clone();
        let old_uid = old_uid.clone();
        async move {
            secrets
                .get_opt("fixme-db")
                .await
                .ok()
                .flatten()
                .filter(|s| s.metadata.uid != old_uid)
        }
    })
    .await;
    let new_uri = secret_value(&repaired, "uri");
    assert_ne!(new_uri, old_uri, "a lost password must be replaced");
    login(&new_uri).await.expect("the new password works");
    let err = login(&old_uri)
        .await
        .expect_err("the old password no longer works");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );

    // Tampering with the password is noticed too (the role's SCRAM verifier disagrees).
    ns.secrets()
        .patch(
            "fixme-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": "guessed"}})),
        )
        .await
        .unwrap();
    let secrets = ns.secrets();
    let fixed = eventually(
        "tampered password replaced",
        Duration::from_secs(30),
        move || {
            let secrets = secrets.clone();
            async move {
                let s = secrets.get("fixme-db").await.ok()?;
                (secret_value(&s, "password") != "guessed").then_some(s)
            }
        },
    )
    .await;
    login(&secret_value(&fixed, "uri"))
        .await
        .expect("repaired credentials work");
    let evs = events(&ns, "fixme").await;
    assert!(evs.iter().any(|e| e.1 == "CredentialsRepaired"), "{evs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_templates_render_and_a_bad_one_changes_nothing() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let mut t = Tenant::test("tpl");
    t.spec.credentials.template = [
        ("DATABASE_URL", "{{ .uri }}"),
        (
            "ConnectionStrings__Default",
            "Host={{ .host }};Port={{ .port }};Database={{ .dbname }};Username={{ .username }};Password={{ .password }};Search Path={{ .schema }}",
        ),
        ("pw.encoded", "{{ .password | urlencode }}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ns.create(t).await;
    wait_ready(&ns, "tpl").await;
    let secret = ns.secrets().get("tpl-db").await.unwrap();
    let password = secret_value(&secret, "password");
    assert_eq!(
        secret_value(&secret, "DATABASE_URL"),
        secret_value(&secret, "uri")
    );
    assert_eq!(
        secret_value(&secret, "ConnectionStrings__Default"),
        format!(
            "Host={};Port={};Database={};Username={};Password={password};Search Path={}",
            secret_value(&secret, "host"),
            secret_value(&secret, "port"),
            secret_value(&secret, "dbname"),
            secret_value(&secret, "username"),
            secret_value(&secret, "schema"),
        )
    );
    login(&secret_value(&secret, "DATABASE_URL"))
        .await
        .expect("the templated URL logs in");

    // A misspelt placeholder on a serving Tenant: refused with the key named, the Secret as it
    // was, the tenant still Ready.
    ns.tenants()
        .patch(
            "tpl",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"credentials": {"template": {"BROKEN": "{{ .pasword }}"}}}}),
            ),
        )
        .await
        .unwrap();
    let t = wait_tenant(&ns, "tpl", "SpecAccepted=False", |t| {
        t.condition("SpecAccepted")
            .is_some_and(|c| c.status == "False")
    })
    .await;
    let refused = t.condition("SpecAccepted").unwrap();
    assert!(
        refused.message.contains("template[BROKEN]") && refused.message.contains(".pasword"),
        "{}",
        refused.message
    );
    assert_eq!(t.condition("Ready").unwrap().status, "True");
    assert!(events(&ns, "tpl")
        .await
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "ChangeRefused"));
    let unchanged = ns.secrets().get("tpl-db").await.unwrap();
    assert_eq!(
        unchanged.data, secret.data,
        "a refused template writes nothing"
    );

    // Fixed: the Secret is re-rendered with the same password.
    ns.tenants()
        .patch(
            "tpl",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"credentials": {"template": {"BROKEN": null, "JDBC": "{{ .jdbcUri }}"}}}})),
        )
        .await
        .unwrap();
    let mut fixed = None;
    for _ in 0..100 {
        let s = ns.secrets().get("tpl-db").await.unwrap();
        if s.data.as_ref().is_some_and(|d| d.contains_key("JDBC")) {
            fixed = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fixed = fixed.expect("the Secret gains the new template key");
    assert_eq!(secret_value(&fixed, "password"), password);
    assert_eq!(
        secret_value(&fixed, "JDBC"),
        secret_value(&fixed, "jdbc-uri")
    );
    assert!(!fixed.data.as_ref().unwrap().contains_key("BROKEN"));

    // A new Tenant with a bad template is Invalid and gets no role or schema.
    let mut bad = Tenant::test("tplbad");
    bad.spec
        .credentials
        .template
        .insert("URL".into(), "{{ .url }}".into());
    ns.create(bad).await;
    let t = wait_tenant(&ns, "tplbad", "Invalid phase", |t| {
        t.status.as_ref().is_some_and(|s| s.phase == Phase::Invalid)
    })
    .await;
    assert!(
        t.condition("Ready")
            .unwrap()
            .message
            .contains("template[URL]"),
        "{:?}",
        t.condition("Ready")
    );
    let schema = ns.schema("tplbad");
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '%') + (SELECT count(*) FROM pg_namespace WHERE nspname = $1)",
    )
    .bind(&schema)
    .fetch_one(&pg().await)
    .await
    .unwrap();
    assert_eq!(n, 0, "an invalid template creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_urls_tls_parameters_reach_the_secret_and_libpq_takes_them() {
    let ns = TestNs::new().await;
    let base = admin_url().to_string();
    let sep = if base.contains('?') { '&' } else { '?' };
    // `prefer` against a server without TLS: libpq asks, is refused, and never opens the CA
    // file; so the URI must log in while carrying every parameter.
    let url = format!("{base}{sep}sslmode=prefer&sslrootcert=%2Fnonexistent%2Fdb%20ca.crt");
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
    )
    .await;
    ns.create(Tenant::test("tls")).await;
    wait_ready(&ns, "tls").await;
    let secret = ns.secrets().get("tls-db").await.unwrap();
    let uri = secret_value(&secret, "uri");
    assert!(
        uri.ends_with("&sslmode=prefer&sslrootcert=%2Fnonexistent%2Fdb%20ca.crt"),
        "{uri}"
    );
    assert!(
        secret_value(&secret, "jdbc-uri")
            .ends_with("&sslmode=prefer&sslrootcert=%2Fnonexistent%2Fdb%20ca.crt"),
        "{}",
        secret_value(&secret, "jdbc-uri")
    );
    // libpq itself (psql) parses the URI, decodes the parameters and logs in.
    let out = std::process::Command::new("psql")
        .args([uri.as_str(), "-XAtc", "SHOW search_path"])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ns.schema("tls")
    );
    // With sslmode=verify-full the same URI must fail on the CA file libpq was told to use.
    let strict = uri.replace("sslmode=prefer", "sslmode=verify-full");
    let out = std::process::Command::new("psql")
        .args([strict.as_str(), "-XAtc", "SELECT 1"])
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "verify-full without a CA logged in");
    assert!(
        err.contains("/nonexistent/db ca.crt") || err.contains("SSL"),
        "{err}"
    );
}
