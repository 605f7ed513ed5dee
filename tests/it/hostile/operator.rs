//! Attacks on the operator and on PostgreSQL itself, with the tenant's own credentials.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use tenantry::{domain::crd::Tenant, postgres::migrations::MigrationSet};

use super::*;
use crate::{api::Api, common::*};

/// Attack 1 of the isolation issue: a trigger that switches to another tenant's role, fired
/// by an API request in the gateway's session. The tenant cannot create the trigger, and the
/// API's answer never holds the other tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_trigger_switching_role_through_the_api_fails() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    two_tenants(&ns).await;
    let (acme, globex) = (ns.schema("acme"), ns.schema("globex"));
    let pg = pg().await;
    sqlx::query(&format!(
        "INSERT INTO \"{globex}\".members (email, display_name) VALUES ('secret@globex.io', 'Globex Secret')"
    ))
    .execute(&pg)
    .await
    .unwrap();

    let mut c = as_tenant(&ns, "acme").await;
    let func = format!(
        "CREATE FUNCTION steal() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN
           SET LOCAL ROLE \"{globex}\";
           SELECT json_agg(m)::text INTO NEW.description FROM \"{globex}\".members m;
           SET LOCAL ROLE \"{acme}\"; RETURN NEW; END$$"
    );
    assert_eq!(sqlstate(c.execute(func.as_str()).await), "42501");
    assert_eq!(
        sqlstate(c.execute(format!("CREATE FUNCTION \"{acme}\".steal() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$").as_str()).await),
        "42501"
    );
    // Even the attack's second half alone: a trigger on an existing function.
    assert_eq!(
        sqlstate(
            c.execute("CREATE TRIGGER t BEFORE INSERT ON projects FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()")
                .await
        ),
        "42501"
    );

    let api = Api::start(&ns, Some(&ns.name)).await;
    let tok = crate::api::token(&ns, "acme").await;
    crate::api::wait_routable(&api, "acme", &tok).await;
    let (status, body, _) = api
        .call(
            Method::POST,
            "/v1/tables/projects",
            &[
                ("x-tenant", "acme"),
                ("authorization", &format!("Bearer {tok}")),
            ],
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!body.to_string().contains("globex.io"), "{body}");
    assert!(body["description"].is_null(), "{body}");
}

/// Attack 2 of the isolation issue: replace the history table with a view whose function
/// makes the tenant superuser when the operator reads it. The tenant cannot rename the table
/// or create the view; and a view planted anyway (here by a superuser, as a tenant could
/// before the owner/app split) is refused unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_history_view_run_by_the_operator_fails() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let acme = ns.schema("acme");
    let pg = pg().await;

    let mut c = as_tenant(&ns, "acme").await;
    assert_eq!(
        sqlstate(
            c.execute("ALTER TABLE tenantry_migrations RENAME TO tm")
                .await
        ),
        "42501"
    );
    assert_eq!(
        sqlstate(
            c.execute("CREATE VIEW tenantry_migrations_x AS SELECT 1 AS version")
                .await
        ),
        "42501"
    );
    // No rights at all on the history table.
    assert_eq!(
        sqlstate(c.execute("SELECT * FROM tenantry_migrations").await),
        "42501"
    );
    assert_eq!(
        sqlstate(c.execute("DELETE FROM tenantry_migrations").await),
        "42501"
    );
    drop(c);

    // Planted anyway: a view whose function would escalate and counts its calls.
    pg.execute(
        format!(
            "SET search_path TO \"{acme}\";
             CREATE SEQUENCE called;
             ALTER TABLE tenantry_migrations RENAME TO tm;
             CREATE FUNCTION x() RETURNS bool LANGUAGE plpgsql AS $$BEGIN
               PERFORM nextval('\"{acme}\".called');
               RESET ROLE;
               EXECUTE 'ALTER ROLE \"{acme}\" SUPERUSER';
               RETURN true; END$$;
             CREATE VIEW tenantry_migrations AS SELECT * FROM tm WHERE x();
             ALTER VIEW tenantry_migrations OWNER TO \"{acme}_owner\";
             RESET search_path;"
        )
        .as_str(),
    )
    .await
    .unwrap();
    drop(ctl);
    // A fresh operator verifies every tenant in full, reading the history of each.
    let _ctl = RunningController::start(&ns).await;
    let t = wait_tenant(&ns, "acme", "history refused", |t| {
        t.condition("MigrationsApplied")
            .is_some_and(|c| c.status == "False" && c.reason == "UntrustedHistory")
    })
    .await;
    let msg = &t.condition("MigrationsApplied").unwrap().message;
    assert!(msg.contains("is a view"), "{msg}");
    let calls: i64 = sqlx::query_scalar(&format!(
        "SELECT last_value - 1 + is_called::int FROM \"{acme}\".called"
    ))
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(calls, 0, "the planted function ran");
    assert!(!is_superuser(&pg, &acme).await);
}

/// The app credential creates nothing anywhere but its own session's temp schema: no table,
/// view, function, trigger, schema, and nothing in `public`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_credential_cannot_create_objects() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let mut c = as_tenant(&ns, "acme").await;
    for ddl in [
        "CREATE TABLE t (x int)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TABLE public.t (x int)",
        "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE SCHEMA mine",
        "CREATE TYPE mood AS ENUM ('a')",
        "CREATE INDEX ON projects (name)",
        "ALTER TABLE projects ADD COLUMN x int",
        "DROP TABLE tasks",
        "CREATE POLICY p ON projects USING (true)",
        "CREATE RULE r AS ON INSERT TO projects DO INSTEAD NOTHING",
        "ALTER TABLE projects OWNER TO CURRENT_USER",
    ] {
        let code = sqlstate(c.execute(ddl).await);
        assert_eq!(code, "42501", "{ddl}");
    }
    // Its own data stays usable, and its temp schema is its own.
    c.execute("INSERT INTO projects (name) VALUES ('mine')")
        .await
        .unwrap();
    c.execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
}

/// `SET ROLE`, `RESET ROLE`, `set_config('role', …)` and `SET SESSION AUTHORIZATION` from the
/// tenant's session reach neither another tenant nor its own owner role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_switching_reaches_no_other_role() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    two_tenants(&ns).await;
    let (acme, globex) = (ns.schema("acme"), ns.schema("globex"));
    let gateway = gateway_role(&ns);
    let mut c = as_tenant(&ns, "acme").await;
    for target in [
        globex.clone(),
        format!("{globex}_owner"),
        format!("{acme}_owner"),
        gateway.clone(),
        "postgres".to_string(),
    ] {
        assert_eq!(
            sqlstate(c.execute(format!("SET ROLE \"{target}\"").as_str()).await),
            "42501",
            "SET ROLE {target}"
        );
        assert_eq!(
            sqlstate(
                sqlx::query("SELECT set_config('role', $1, false)")
                    .bind(&target)
                    .execute(&mut c)
                    .await
            ),
            "42501",
            "set_config role {target}"
        );
        assert_eq!(
            sqlstate(
                c.execute(format!("SET SESSION AUTHORIZATION \"{target}\"").as_str())
                    .await
            ),
            "42501",
            "SET SESSION AUTHORIZATION {target}"
        );
    }
    c.execute("RESET ROLE").await.unwrap();
    let who: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(who, acme);
    assert_eq!(
        sqlstate(
            c.execute(format!("SELECT * FROM \"{globex}\".members").as_str())
                .await
        ),
        "42501"
    );

    // The gateway may act as app roles only: not as any owner role, not as the admin.
    let pg = pg().await;
    let member_of: Vec<String> = sqlx::query_scalar(
        "SELECT r.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
          JOIN pg_roles g ON g.oid = m.member WHERE g.rolname = $1 ORDER BY 1",
    )
    .bind(&gateway)
    .fetch_all(&pg)
    .await
    .unwrap();
    assert_eq!(member_of, [acme.clone(), globex.clone()]);
}

/// Ownership marks live in comments only the owner (or a role administrator) can write: the
/// tenant cannot forge one to claim or disown a schema or role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ownership_marks_are_refused() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    two_tenants(&ns).await;
    let (acme, globex) = (ns.schema("acme"), ns.schema("globex"));
    let forged = format!(
        r#"{{"managedBy":"tenantry","namespace":"{}","name":"globex","uid":"x"}}"#,
        ns.name
    );
    let mut c = as_tenant(&ns, "acme").await;
    for target in [
        format!("SCHEMA \"{acme}\""),
        format!("SCHEMA \"{globex}\""),
        format!("ROLE \"{acme}\""),
        format!("ROLE \"{acme}_owner\""),
        format!("ROLE \"{globex}\""),
    ] {
        let code = sqlstate(
            c.execute(format!("COMMENT ON {target} IS '{forged}'").as_str())
                .await,
        );
        assert_eq!(code, "42501", "{target}");
    }
}

/// A tenant holding the advisory lock of another tenant's migrations (the key is guessable)
/// and locks on its own tables: the stalled tenants get a clear condition and a retry; every
/// other tenant is provisioned as if nothing happened, and the stalled ones converge once the
/// locks are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_stalls_cost_only_the_stalled_tenants() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let mut c = as_tenant(&ns, "acme").await;
    // More stalled tenants than the operator has connections (4 in tests).
    let victims: Vec<String> = (0..6).map(|i| format!("victim{i}")).collect();
    c.execute("BEGIN").await.unwrap();
    for v in &victims {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("tenantry.migrate:{}", ns.schema(v)))
            .execute(&mut c)
            .await
            .unwrap();
    }
    for v in &victims {
        ns.create(Tenant::test(v)).await;
    }
    ns.create(Tenant::test("bystander")).await;
    // The bystander is provisioned while every victim waits on its lock.
    let started = std::time::Instant::now();
    wait_ready(&ns, "bystander").await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bystander took {:?}",
        started.elapsed()
    );
    let stalled = wait_tenant(&ns, "victim0", "a lock condition", |t| {
        t.condition("MigrationsApplied")
            .is_some_and(|c| c.status == "False" && c.message.contains("lock"))
    })
    .await;
    assert_eq!(
        stalled.condition("MigrationsApplied").unwrap().reason,
        "LockTimeout"
    );
    c.execute("ROLLBACK").await.unwrap();
    for v in &victims {
        wait_ready(&ns, v).await;
    }
}

/// With an admin that is not a superuser (CREATEROLE and CREATE on the database only, as on
/// managed services), the tenant gains nothing from attacking the operator either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn createrole_admin_gives_the_tenant_nothing() {
    let ns = TestNs::new().await;
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
    let url = format!("postgres://{admin}:{password}@{host}:{port}/tenantry");
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
    )
    .await;
    two_tenants(&ns).await;
    let (acme, globex) = (ns.schema("acme"), ns.schema("globex"));
    let mut c = as_tenant(&ns, "acme").await;
    for attempt in [
        format!("GRANT \"{globex}\" TO \"{acme}\""),
        format!("GRANT \"{acme}_owner\" TO \"{acme}\""),
        format!("ALTER ROLE \"{acme}\" CREATEROLE"),
        format!("SET ROLE \"{admin}\""),
        "CREATE TABLE t (x int)".to_string(),
    ] {
        assert_eq!(
            sqlstate(c.execute(attempt.as_str()).await),
            "42501",
            "{attempt}"
        );
    }
    assert!(!is_superuser(&pg, &acme).await);
    // The owner role exists, cannot log in, and owns the schema.
    let (login, owner): (bool, String) = sqlx::query_as(
        "SELECT r.rolcanlogin, pg_get_userbyid(n.nspowner)::text FROM pg_roles r, pg_namespace n
          WHERE r.rolname = $1 AND n.nspname = $2",
    )
    .bind(format!("{acme}_owner"))
    .bind(&acme)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(!login);
    assert_eq!(owner, format!("{acme}_owner"));
}

/// A tenant as the release before the owner/app split left it: its login role owns the schema
/// and everything in it, the migrations were applied as that role, the Tenant exists and the
/// old Secret holds its credentials. `plant` then runs as that login role inside the schema
/// (what a tenant could do with its old rights). Returns the login password.
async fn legacy_tenant(pg: &sqlx::PgPool, ns: &TestNs, name: &str, plant: &str) -> String {
    let schema = ns.schema(name);
    let tenant = ns.create(Tenant::test(name)).await;
    let uid = tenant.metadata.uid.clone().unwrap();
    let mark = format!(
        r#"{{"managedBy":"tenantry","namespace":"{}","name":"{name}","uid":"{uid}"}}"#,
        ns.name
    );
    let password = random_suffix() + &random_suffix() + &random_suffix();
    let mut setup = format!(
        "CREATE ROLE \"{schema}\" LOGIN INHERIT PASSWORD '{password}';
         COMMENT ON ROLE \"{schema}\" IS '{mark}';
         ALTER ROLE \"{schema}\" SET search_path TO \"{schema}\";
         CREATE SCHEMA \"{schema}\" AUTHORIZATION \"{schema}\";
         COMMENT ON SCHEMA \"{schema}\" IS '{mark}';
         REVOKE ALL ON SCHEMA \"{schema}\" FROM PUBLIC;
         SET ROLE \"{schema}\"; SET search_path TO \"{schema}\";
         CREATE TABLE tenantry_migrations (version bigint PRIMARY KEY, description text NOT NULL,
           checksum bytea NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
           execution_ms bigint NOT NULL);"
    );
    for m in MigrationSet::embedded().migrations() {
        setup.push_str(&m.sql);
        setup.push_str(&format!(
            ";\nINSERT INTO tenantry_migrations (version, description, checksum, execution_ms)
              VALUES ({}, '{}', '\\x{}', 1);\n",
            m.version,
            m.description,
            m.checksum
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
    }
    setup.push_str(
        "INSERT INTO members (email, display_name) VALUES ('a@legacy.io', 'A');
         INSERT INTO projects (name) VALUES ('p1'), ('p2');",
    );
    setup.push_str(plant);
    setup.push_str(";\nRESET ROLE; RESET search_path;");
    // The old release's admin made these roles; one that is not a superuser holds ADMIN OPTION
    // on the roles it created (PostgreSQL 16 grants it implicitly).
    if let Some(admin) = admin_role() {
        setup.push_str(&format!(
            "GRANT \"{schema}\" TO \"{admin}\" WITH ADMIN OPTION;"
        ));
    }
    let mut conn = pg.acquire().await.unwrap();
    conn.execute(setup.as_str()).await.unwrap();
    drop(conn);
    let (host, port) = host_port();
    let endpoint = tenantry::domain::state::Endpoint {
        host,
        port,
        dbname: "tenantry".into(),
        tls: Vec::new(),
    };
    // The old Secret: the keys and values the old release wrote.
    let mut secret = tenantry::domain::credentials::desired(
        &tenant,
        &endpoint,
        &tenantry::domain::credentials::Login::app(
            &tenantry::domain::naming::Ident::parse("schema", &schema).unwrap(),
        ),
        &tenantry::domain::credentials::Material {
            password: password.clone(),
            jwt_key: "k".repeat(64),
        },
    );
    secret.metadata = ObjectMeta {
        resource_version: None,
        ..secret.metadata
    };
    ns.secrets()
        .create(&PostParams::default(), &Secret { ..secret })
        .await
        .unwrap();
    password
}

/// A hash of every row of the tenant's members and projects.
async fn data_hash(pg: &sqlx::PgPool, schema: &str) -> String {
    sqlx::query_scalar::<_, String>(&format!(
        "SELECT md5((SELECT string_agg(t::text, ',' ORDER BY id) FROM \"{schema}\".members t) ||
                    (SELECT string_agg(t::text, ',' ORDER BY id) FROM \"{schema}\".projects t))"
    ))
    .fetch_one(pg)
    .await
    .unwrap()
}

/// Owners of the schema and of everything in it.
async fn owners(pg: &sqlx::PgPool, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT pg_get_userbyid(relowner)::text FROM pg_class WHERE relnamespace = $1::regnamespace
         UNION SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1
         UNION SELECT DISTINCT pg_get_userbyid(proowner)::text FROM pg_proc WHERE pronamespace = $1::regnamespace",
    )
    .bind(schema)
    .fetch_all(pg)
    .await
    .unwrap()
}

/// A tenant provisioned by the release before the owner/app split, holding exactly what its
/// migrations created, is converted on the first reconcile: the owner role takes over the
/// schema and every object, the login keeps read/write access only, data and the existing
/// Secret's password are untouched, and a Warning Event records the conversion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_in_place_converts_a_tenant_of_the_old_layout() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let schema = ns.schema("acme");
    let password = legacy_tenant(&pg, &ns, "acme", "").await;
    let before = data_hash(&pg, &schema).await;

    let _ctl = RunningController::start(&ns).await;
    let t = wait_ready(&ns, "acme").await;
    let status = t.status.unwrap();
    assert_eq!(
        status.owner_role.as_deref(),
        Some(format!("{schema}_owner").as_str())
    );
    assert_eq!(status.migration_version, Some(2));
    assert_eq!(owners(&pg, &schema).await, [format!("{schema}_owner")]);
    assert_eq!(data_hash(&pg, &schema).await, before, "data changed");

    // The old Secret's password still logs in, reads and writes, and creates nothing.
    let s = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(secret_value(&s, "password"), password);
    let mut c = PgConnection::connect(&secret_value(&s, "uri"))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    c.execute("UPDATE members SET display_name = 'B'")
        .await
        .unwrap();
    assert_eq!(sqlstate(c.execute("CREATE TABLE t (x int)").await), "42501");
    assert_eq!(
        sqlstate(c.execute("SELECT * FROM tenantry_migrations").await),
        "42501"
    );

    let evs = events(&ns, "acme").await;
    let warning = evs
        .iter()
        .find(|(ty, reason, _)| ty == "Warning" && reason == "OwnershipConverted")
        .unwrap_or_else(|| panic!("no conversion warning in {evs:?}"));
    assert!(
        warning
            .2
            .contains("matches what its applied migrations create"),
        "{}",
        warning.2
    );

    // A second reconcile leaves it alone: no second conversion.
    ns.tenants()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = events(&ns, "acme")
        .await
        .iter()
        .filter(|(_, reason, _)| reason == "OwnershipConverted")
        .count();
    assert_eq!(n, 1);
}

/// A tenant of the old layout that planted a trigger with its old rights is not converted (and
/// so not served) until an administrator reviewed it: the condition and a Warning name the
/// planted objects; the review annotation converts it, and the Warning lists them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_holds_a_tampered_tenant_of_the_old_layout_for_review() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let schema = ns.schema("initech");
    legacy_tenant(
        &pg,
        &ns,
        "initech",
        "CREATE FUNCTION steal() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
         CREATE TRIGGER planted BEFORE INSERT ON projects FOR EACH ROW EXECUTE FUNCTION steal();",
    )
    .await;
    let _ctl = RunningController::start(&ns).await;
    let t = wait_tenant(&ns, "initech", "ReviewRequired", |t| {
        t.condition("SchemaReady")
            .is_some_and(|c| c.reason == "ReviewRequired")
    })
    .await;
    let msg = &t.condition("SchemaReady").unwrap().message;
    assert!(msg.contains("planted") && msg.contains("steal()"), "{msg}");
    assert!(!t.is_ready());
    // Not converted: nothing changed hands.
    assert_eq!(owners(&pg, &schema).await, vec![schema.clone()]);
    assert!(events(&ns, "initech")
        .await
        .iter()
        .any(|(ty, reason, _)| ty == "Warning" && reason == "ReviewRequired"));

    ns.tenants()
        .patch(
            "initech",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "tenantry.dev/legacy-schema-reviewed": "kept the trigger on purpose"
            }}})),
        )
        .await
        .unwrap();
    wait_ready(&ns, "initech").await;
    assert_eq!(owners(&pg, &schema).await, [format!("{schema}_owner")]);
    let evs = events(&ns, "initech").await;
    let warning = evs
        .iter()
        .find(|(ty, reason, _)| ty == "Warning" && reason == "OwnershipConverted")
        .unwrap_or_else(|| panic!("no conversion warning in {evs:?}"));
    assert!(
        warning.2.contains("trigger planted on projects"),
        "{}",
        warning.2
    );
    assert!(warning.2.contains("steal()"), "{}", warning.2);
}

/// With its old rights, a tenant set a column default built only from pg_catalog functions
/// that switches to another tenant's role (`set_config('role', …)`) and reads its members,
/// to fire in the API gateway's session on its next insert. The schema is held for review, so
/// the API never serves it and no answer carries the other tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_legacy_planted_default_read_through_the_api_fails() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let globex = ns.schema("globex");
    let plant = format!(
        "ALTER TABLE projects ALTER COLUMN description SET DEFAULT
           (pg_catalog.query_to_xml(pg_catalog.concat(
              pg_catalog.left(pg_catalog.set_config('role', '{globex}', true), 0),
              'SELECT pg_catalog.json_agg(m)::text AS loot FROM \"{globex}\".members m'),
            false, false, '')::text)"
    );
    legacy_tenant(&pg, &ns, "acme", &plant).await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("globex")).await;
    wait_ready(&ns, "globex").await;
    sqlx::query(&format!(
        "INSERT INTO \"{globex}\".members (email, display_name) VALUES ('secret@globex.io', 'Globex Secret')"
    ))
    .execute(&pg)
    .await
    .unwrap();
    let t = wait_tenant(&ns, "acme", "ReviewRequired", |t| {
        t.condition("SchemaReady")
            .is_some_and(|c| c.reason == "ReviewRequired")
    })
    .await;
    let msg = &t.condition("SchemaReady").unwrap().message;
    assert!(msg.contains("column projects.description"), "{msg}");

    let api = Api::start(&ns, Some(&ns.name)).await;
    let tok = crate::api::token(&ns, "acme").await;
    let (status, body, _) = api
        .call(
            Method::POST,
            "/v1/tables/projects",
            &[
                ("x-tenant", "acme"),
                ("authorization", &format!("Bearer {tok}")),
            ],
            Some(json!({"name": "x"})),
        )
        .await;
    assert_ne!(status, StatusCode::CREATED, "{body}");
    assert!(!body.to_string().contains("globex.io"), "{body}");
}

/// With its old rights, a tenant set a default on the history table's `applied_at` that resets
/// the role to the session user and runs a query — to fire in the operator's admin session at
/// the next migration. The history is not the operator's table, so it is never written (or
/// trusted); the tenant is held for review and the planted query never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_legacy_history_default_run_by_the_operator_fails() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let schema = ns.schema("acme");
    let plant = format!(
        "CREATE SEQUENCE called;
         ALTER TABLE tenantry_migrations ALTER COLUMN applied_at SET DEFAULT
           (CASE WHEN pg_catalog.query_to_xml(pg_catalog.concat(
              pg_catalog.left(pg_catalog.set_config('role', 'none', true), 0),
              'SELECT pg_catalog.nextval(''\"{schema}\".called'')'),
             false, false, '') IS NOT NULL THEN pg_catalog.now() END)"
    );
    legacy_tenant(&pg, &ns, "acme", &plant).await;
    // A new migration set, so that the operator would record a migration.
    let mut files = MigrationSet::embedded().to_files();
    files.push((
        "3_archived.sql".into(),
        "ALTER TABLE projects ADD COLUMN archived boolean NOT NULL DEFAULT false;".into(),
    ));
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations: MigrationSet::from_files(files).unwrap(),
            ..ControllerOpts::default()
        },
    )
    .await;
    let t = wait_tenant(&ns, "acme", "ReviewRequired", |t| {
        t.condition("SchemaReady")
            .is_some_and(|c| c.reason == "ReviewRequired")
    })
    .await;
    let msg = &t.condition("SchemaReady").unwrap().message;
    assert!(msg.contains("history"), "{msg}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls: i64 = sqlx::query_scalar(&format!(
        "SELECT last_value - 1 + is_called::int FROM \"{schema}\".called"
    ))
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(
        calls, 0,
        "the planted default ran in the operator's session"
    );
    assert!(!is_superuser(&pg, &schema).await);
}

/// A Tenant lists another tenant's base-domain host (`globex.tenants.test`) in its
/// `spec.hosts` to receive its traffic. The host stays globex's, acme's Routable condition says
/// why, and acme's token gets nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_claiming_another_tenants_base_domain_host_fails() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let stolen = format!("globex.{BASE_DOMAIN}");
    ns.create(Tenant::test("acme").with_hosts(&[&stolen])).await;
    wait_ready(&ns, "acme").await;
    ns.create(Tenant::test("globex")).await;
    wait_ready(&ns, "globex").await;
    // The claim turns unroutable once globex exists (acme is reconciled again for it).
    let acme = wait_tenant(&ns, "acme", "Routable=False", |t| {
        t.condition("Routable").is_some_and(|c| c.status == "False")
    })
    .await;
    let msg = &acme.condition("Routable").unwrap().message;
    assert!(msg.contains(&stolen) && msg.contains("globex"), "{msg}");

    let api = Api::start(&ns, Some(&ns.name)).await;
    let (acme_tok, globex_tok) = (
        crate::api::token(&ns, "acme").await,
        crate::api::token(&ns, "globex").await,
    );
    crate::api::wait_routable(&api, "globex", &globex_tok).await;
    let call = |tok: String| {
        let api = &api;
        let stolen = stolen.clone();
        async move {
            api.call(
                Method::GET,
                "/v1/tenant",
                &[
                    ("host", &stolen),
                    ("authorization", &format!("Bearer {tok}")),
                ],
                None,
            )
            .await
        }
    };
    let (status, body, _) = call(globex_tok).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "globex");
    let (status, body, _) = call(acme_tok).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.to_string().contains("\"schema\""), "{body}");
}

/// One tenant opens sessions until the server has none left, locking every other tenant and
/// the API gateway out. Its login role has a connection limit it cannot lift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_exhausting_the_servers_connections_fails() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let s = ns.secrets().get("acme-db").await.unwrap();
    let uri = secret_value(&s, "uri");
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..100 {
        match PgConnection::connect(&uri).await {
            Ok(c) => held.push(c),
            Err(e) => {
                refused = Some(sqlstate::<()>(Err(e)));
                break;
            }
        }
    }
    assert_eq!(held.len(), 20, "sessions the tenant could open");
    assert_eq!(refused.as_deref(), Some("53300"));
    assert_eq!(
        sqlstate(
            held[0]
                .execute(
                    format!("ALTER ROLE \"{}\" CONNECTION LIMIT -1", ns.schema("acme")).as_str()
                )
                .await
        ),
        "42501"
    );
    // The gateway still logs in.
    PgConnection::connect(&crate::api::gateway_uri(&ns).await)
        .await
        .expect("gateway login while the tenant holds its maximum");
}
