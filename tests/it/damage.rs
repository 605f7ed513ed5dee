//! Out-of-band damage: what a superuser (or someone with the Secret's namespace) breaks by hand
//! behind the operator's back is found at the next full verification (here `--resync-secs` 1),
//! reported in a condition and an Event, and either repaired or left for a human with a clear
//! reason — never silently, and never by dropping anything. The tenant's own credentials can
//! cause none of it.

use std::time::{Duration, Instant};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tenantry::{
    domain::crd::{Phase, Tenant},
    postgres::migrations::MigrationSet,
};

use crate::{
    common::*,
    hostile::{as_tenant, sqlstate},
};

/// A full verification every second: damage in PostgreSQL is found within seconds.
fn opts() -> ControllerOpts {
    ControllerOpts {
        resync: Duration::from_secs(1),
        ..ControllerOpts::default()
    }
}

/// (status, reason, message) of a condition.
fn cond(t: &Tenant, type_: &str) -> (String, String, String) {
    t.condition(type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits until condition `type_` has `reason`; returns the Tenant.
async fn wait_reason(ns: &TestNs, name: &str, type_: &'static str, reason: &'static str) -> Tenant {
    let what = format!("{type_} reason {reason}");
    let started = Instant::now();
    let t = wait_tenant(ns, name, Box::leak(what.into_boxed_str()), move |t| {
        t.condition(type_).is_some_and(|c| c.reason == reason)
    })
    .await;
    eprintln!(
        "damage: {name} {type_}={reason} after {:?}",
        started.elapsed()
    );
    t
}

/// Waits for an Event of `type_` and `reason` about `name`; returns its note.
async fn wait_event(ns: &TestNs, name: &str, type_: &str, reason: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let evs = events(ns, name).await;
        if let Some(e) = evs.iter().find(|e| e.0 == type_ && e.1 == reason) {
            return e.2.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {type_} Event {reason} for {name}: {evs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the controller has run `n` more reconciles (of a tenant that is not Ready, each
/// a full verification): what did not happen by then is not going to.
async fn reconciles(ctl: &RunningController, n: u64) {
    let start = ctl.metrics.reconciliations();
    let m = ctl.metrics.clone();
    eventually("more reconciles", Duration::from_secs(30), move || {
        let m = m.clone();
        async move { (m.reconciliations() >= start + n).then_some(()) }
    })
    .await;
}

/// A full reconcile now: any change to the Tenant, here an annotation nobody reads.
async fn touch(ns: &TestNs, name: &str, value: &str) {
    ns.tenants()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": value}}})),
        )
        .await
        .unwrap();
}

async fn by_hand(pg: &PgPool, sql: &str) {
    pg.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn schema_exists(pg: &PgPool, schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn role_exists(pg: &PgPool, role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn role_comment(pg: &PgPool, role: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
    )
    .bind(role)
    .fetch_one(pg)
    .await
    .unwrap()
}

async fn schema_comment(pg: &PgPool, schema: &str) -> Option<String> {
    sqlx::query_scalar("SELECT obj_description($1::regnamespace, 'pg_namespace')")
        .bind(schema)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn members(pg: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".members"))
        .fetch_one(pg)
        .await
        .unwrap()
}

/// Relations in the schema, with their kinds.
async fn relations(pg: &PgPool, schema: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT relname::text, relkind::text FROM pg_class
          WHERE relnamespace = $1::regnamespace ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pg)
    .await
    .unwrap()
}

async fn add_member(uri: &str, email: &str) {
    let mut c = PgConnection::connect(uri).await.unwrap();
    sqlx::query("INSERT INTO members (email, display_name) VALUES ($1, 'x')")
        .bind(email)
        .execute(&mut c)
        .await
        .unwrap();
}

/// App role and owner role dropped by a superuser: both are made again (they are
/// deterministic) with this Tenant's mark, the app role with a new password in the Secret and
/// its rights on the existing tables back (the gateway may act as it again); Warning Event
/// `RoleRecreated`, `RoleReady reason=Recreated`. The data is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_roles_are_recreated_with_their_rights_and_reported() {
    let ns = TestNs::new().await;
    dropped_app_role(&ns, opts()).await;
}

/// The same with an admin that has only CREATEROLE (as on managed services): it makes itself a
/// member of the role it creates again, and gives the gateway its membership back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_roles_are_recreated_by_a_createrole_admin() {
    let ns = TestNs::new().await;
    let database_url = crate::suspend::createrole_admin(&ns).await;
    dropped_app_role(
        &ns,
        ControllerOpts {
            database_url,
            ..opts()
        },
    )
    .await;
}

async fn dropped_app_role(ns: &TestNs, opts: ControllerOpts) {
    let _ctl = RunningController::start_with(ns, opts).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(ns, "acme").await;
    let pg = pg().await;
    let schema = ns.schema("acme");
    let old_uri = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    add_member(&old_uri, "a@example.com").await;

    // The app role: its grants go with DROP OWNED (DROP ROLE alone refuses while it has any).
    let dropped = Instant::now();
    by_hand(
        &pg,
        &format!("DROP OWNED BY \"{schema}\"; DROP ROLE \"{schema}\""),
    )
    .await;
    let t = wait_reason(ns, "acme", "RoleReady", "Recreated").await;
    eprintln!("damage: app role recreated after {:?}", dropped.elapsed());
    let (_, _, message) = cond(&t, "RoleReady");
    assert!(message.contains("dropped out of band"), "{message}");
    let note = wait_event(ns, "acme", "Warning", "RoleRecreated").await;
    assert!(note.contains(&format!("app role {schema}")), "{note}");
    let t = wait_ready(ns, "acme").await;
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Ready);
    assert!(role_comment(&pg, &schema)
        .await
        .is_some_and(|c| c.contains(&ns.name) && c.contains("\"acme\"")));
    // A new password, in the Secret; the old one is gone with the role.
    let secrets = ns.secrets();
    let old = old_uri.clone();
    let new_uri = eventually("Secret rewritten", Duration::from_secs(30), move || {
        let secrets = secrets.clone();
        let old = old.clone();
        async move {
            let s = secrets.get("acme-db").await.ok()?;
            let uri = secret_value(&s, "uri");
            (uri != old).then_some(uri)
        }
    })
    .await;
    assert!(PgConnection::connect(&old_uri).await.is_err());
    // Its rights on the tables that already existed are back; the history stays the operator's.
    let mut c = PgConnection::connect(&new_uri).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM members")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "the data is untouched and readable");
    sqlx::query("INSERT INTO members (email, display_name) VALUES ('b@example.com', 'b')")
        .execute(&mut c)
        .await
        .unwrap();
    assert_eq!(
        sqlstate(c.execute("SELECT * FROM tenantry_migrations").await),
        "42501"
    );
    assert_eq!(
        sqlstate(c.execute("CREATE TABLE planted (id int)").await),
        "42501"
    );
    let gw_member: bool = sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER')")
        .bind(gateway_role(ns))
        .bind(&schema)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert!(gw_member, "the gateway may act as the app role again");
}

/// The schema (and then its owner role) dropped by a superuser: the data is gone, and the
/// operator does not hide it behind a new empty schema. `SchemaReady=False
/// reason=SchemaMissing`, Warning Event `SchemaMissing`, nothing created, until the annotation
/// `tenantry.dev/recreate-schema` gets a value; then the schema is created again and migrated
/// (Warning Event `SchemaRecreated`). A later loss with the same value is not recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_schema_is_reported_and_recreated_only_on_request() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start_with(&ns, opts()).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let pg = pg().await;
    let schema = ns.schema("acme");
    let owner = format!("{schema}_owner");

    // The owner role can only go once what it owns is gone: drop both.
    by_hand(
        &pg,
        &format!(
            "DROP SCHEMA \"{schema}\" CASCADE; DROP OWNED BY \"{owner}\"; DROP ROLE \"{owner}\""
        ),
    )
    .await;
    let t = wait_reason(&ns, "acme", "SchemaReady", "SchemaMissing").await;
    let status = t.status.as_ref().unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(!t.is_ready());
    let (s, _, message) = cond(&t, "SchemaReady");
    assert_eq!(s, "False");
    assert!(
        message.contains("its data is gone") && message.contains("tenantry.dev/recreate-schema"),
        "{message}"
    );
    let note = wait_event(&ns, "acme", "Warning", "SchemaMissing").await;
    assert!(note.contains(&schema), "{note}");
    // The owner role is deterministic and holds nothing: made again, and said so.
    let note = wait_event(&ns, "acme", "Warning", "RoleRecreated").await;
    assert!(note.contains(&format!("owner role {owner}")), "{note}");
    assert!(role_exists(&pg, &owner).await);
    // Several verifications later, still no schema.
    reconciles(&ctl, 3).await;
    assert!(!schema_exists(&pg, &schema).await, "recreated unasked");
    let t = ns.tenants().get("acme").await.unwrap();
    assert_eq!(cond(&t, "SchemaReady").1, "SchemaMissing");

    // Asked for: created again, empty, migrated.
    let asked = Instant::now();
    ns.tenants()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"tenantry.dev/recreate-schema": "1"}}}),
            ),
        )
        .await
        .unwrap();
    let t = wait_ready(&ns, "acme").await;
    eprintln!(
        "damage: schema recreated on request after {:?}",
        asked.elapsed()
    );
    let status = t.status.as_ref().unwrap();
    assert_eq!(status.recreate_schema_request.as_deref(), Some("1"));
    assert_eq!(status.migration_version, Some(2));
    assert_eq!(members(&pg, &schema).await, 0, "a new, empty schema");
    let note = wait_event(&ns, "acme", "Warning", "SchemaRecreated").await;
    assert!(note.contains("data is lost"), "{note}");
    let uri = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    add_member(&uri, "a@example.com").await;

    // Lost again: the annotation's value was used up; nothing is recreated.
    by_hand(&pg, &format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
    let t = wait_reason(&ns, "acme", "SchemaReady", "SchemaMissing").await;
    assert!(
        cond(&t, "SchemaReady").2.contains("acted on before"),
        "{:?}",
        cond(&t, "SchemaReady")
    );
    reconciles(&ctl, 3).await;
    assert!(
        !schema_exists(&pg, &schema).await,
        "recreated for a used value"
    );
}

/// The migration history dropped (the schema still holds the tenant's tables): no migration
/// runs over what exists. `MigrationsApplied=False reason=HistoryMissing`, Warning Event,
/// tables and data untouched; restoring the history as the README says makes it Ready again.
/// The tenant's own login can do none of this damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_history_stops_migrations_until_restored() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start_with(&ns, opts()).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let pg = pg().await;
    let schema = ns.schema("acme");
    let owner = format!("{schema}_owner");
    let uri = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    add_member(&uri, "a@example.com").await;

    // The tenant, with its own login, tries each damage of this module.
    let mut c = as_tenant(&ns, "acme").await;
    for attack in [
        "DROP TABLE tenantry_migrations".to_string(),
        "TRUNCATE tenantry_migrations".to_string(),
        "DELETE FROM tenantry_migrations".to_string(),
        "ALTER TABLE tenantry_migrations RENAME TO old".to_string(),
        "DROP TABLE members CASCADE".to_string(),
        format!("DROP SCHEMA \"{schema}\" CASCADE"),
        format!("DROP OWNED BY \"{owner}\""),
        format!("DROP ROLE \"{owner}\""),
        format!("COMMENT ON SCHEMA \"{schema}\" IS NULL"),
        format!("COMMENT ON ROLE \"{schema}\" IS 'x'"),
        format!("COMMENT ON ROLE \"{owner}\" IS NULL"),
        format!("ALTER SCHEMA \"{schema}\" RENAME TO elsewhere"),
    ] {
        let code = sqlstate(c.execute(attack.as_str()).await);
        assert_eq!(code, "42501", "{attack}");
    }
    drop(c);
    let before = relations(&pg, &schema).await;
    assert!(before.iter().any(|(r, _)| r == "tenantry_migrations"));

    by_hand(&pg, &format!("DROP TABLE \"{schema}\".tenantry_migrations")).await;
    let t = wait_reason(&ns, "acme", "MigrationsApplied", "HistoryMissing").await;
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Failed);
    let (s, _, message) = cond(&t, "MigrationsApplied");
    assert_eq!(s, "False");
    assert!(
        message.contains("none is run") && message.contains("status.migrationVersion says 2"),
        "{message}"
    );
    let note = wait_event(&ns, "acme", "Warning", "HistoryMissing").await;
    assert!(note.contains("Restore the table"), "{note}");
    // Several verifications later: nothing ran, nothing was dropped, the data is there.
    reconciles(&ctl, 3).await;
    let after = relations(&pg, &schema).await;
    let expected: Vec<_> = before
        .iter()
        .filter(|(r, _)| !r.starts_with("tenantry_migrations"))
        .cloned()
        .collect();
    assert_eq!(after, expected);
    assert_eq!(members(&pg, &schema).await, 1);

    // The README's restore: the table again, as the owner role, with a row per applied file.
    let mut tx = pg.begin().await.unwrap();
    tx.execute(
        format!(
            "SET LOCAL ROLE \"{owner}\";
             CREATE TABLE \"{schema}\".tenantry_migrations (
                 version bigint PRIMARY KEY, description text NOT NULL, checksum bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(), execution_ms bigint NOT NULL);
             REVOKE ALL ON \"{schema}\".tenantry_migrations FROM \"{schema}\""
        )
        .as_str(),
    )
    .await
    .unwrap();
    for m in MigrationSet::embedded().migrations() {
        sqlx::query(&format!(
            "INSERT INTO \"{schema}\".tenantry_migrations (version, description, checksum, execution_ms)
             VALUES ($1, $2, $3, 0)"
        ))
        .bind(m.version)
        .bind(&m.description)
        .bind(&m.checksum)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    touch(&ns, "acme", "restored").await;
    let t = wait_ready(&ns, "acme").await;
    assert_eq!(cond(&t, "MigrationsApplied").1, "UpToDate");
    assert_eq!(members(&pg, &schema).await, 1);
}

/// The Secret overwritten with garbage: keys removed, a password that is not UTF-8, a wrong
/// username, a key of someone else's, the operator's labels gone. Repaired to working
/// credentials (a new password), the foreign key removed; Event `CredentialsRepaired`,
/// `CredentialsReady reason=Repaired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_full_of_garbage_is_repaired_and_reported() {
    let ns = TestNs::new().await;
    // The repair is triggered by the Secret's watch; the condition says Repaired until the
    // next full verification, 3 s later.
    let ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            resync: Duration::from_secs(3),
            ..ControllerOpts::default()
        },
    )
    .await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let original = ns.secrets().get("acme-db").await.unwrap();
    let old_uri = secret_value(&original, "uri");

    let mut garbage = original.clone();
    garbage.metadata.managed_fields = None;
    garbage.metadata.labels = None;
    garbage.data = Some(
        [
            ("password", vec![0xff, 0xfe, 0x00, 0x80]),
            ("username", b"postgres".to_vec()),
            ("junk", b"\x00\x01not ours".to_vec()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v)))
        .collect(),
    );
    let damaged = Instant::now();
    ns.secrets()
        .replace("acme-db", &Default::default(), &garbage)
        .await
        .unwrap();
    let secrets = ns.secrets();
    let repaired: Secret = eventually("Secret repaired", Duration::from_secs(30), move || {
        let secrets = secrets.clone();
        async move {
            let s = secrets.get("acme-db").await.ok()?;
            let d = s.data.as_ref()?;
            (d.contains_key("uri") && !d.contains_key("junk")).then_some(s)
        }
    })
    .await;
    eprintln!("damage: Secret repaired after {:?}", damaged.elapsed());
    assert_eq!(secret_value(&repaired, "username"), schema);
    assert!(repaired
        .metadata
        .labels
        .as_ref()
        .is_some_and(
            |l| l.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("tenantry")
        ));
    let uri = secret_value(&repaired, "uri");
    PgConnection::connect(&uri)
        .await
        .expect("repaired credentials log in");
    assert_ne!(uri, old_uri, "a password that was lost is replaced");
    let note = wait_event(&ns, "acme", "Normal", "CredentialsRepaired").await;
    assert!(note.contains("acme-db"), "{note}");
    let t = wait_reason(&ns, "acme", "CredentialsReady", "Repaired").await;
    assert_eq!(cond(&t, "CredentialsReady").0, "True");
    // Repaired once: the next full verifications keep it as it is.
    let rv = repaired.metadata.resource_version.clone();
    let t = wait_reason(&ns, "acme", "CredentialsReady", "Issued").await;
    assert!(t.is_ready());
    reconciles(&ctl, 2).await;
    let now = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(
        now.metadata.resource_version, rv,
        "repaired again and again"
    );
}

/// Ownership marks edited by hand, to garbage or to another Tenant's identity: the objects
/// this Tenant provisioned are reported (`OwnershipMarkChanged`, with the statement restoring
/// the mark), never marked again by the operator; restoring the mark heals it. Deleted with
/// `deletionPolicy: Delete`, what carries no mark of this Tenant is not dropped (nor its
/// owner role, which owns it); with `Retain`, an unmarked login is not locked; each time a
/// Warning Event `KeptUnmarked` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_marks_are_reported_never_remarked_and_never_dropped() {
    let ns = TestNs::new().await;
    let ctl = RunningController::start_with(&ns, opts()).await;
    ns.create(Tenant::test("acme").deleting()).await;
    ns.create(Tenant::test("globex")).await;
    wait_ready(&ns, "acme").await;
    wait_ready(&ns, "globex").await;
    let pg = pg().await;
    let (acme, globex) = (ns.schema("acme"), ns.schema("globex"));
    let owner = format!("{acme}_owner");
    let uri = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    add_member(&uri, "a@example.com").await;

    // Garbage on the app role.
    by_hand(&pg, &format!("COMMENT ON ROLE \"{acme}\" IS 'hand made'")).await;
    let t = wait_reason(&ns, "acme", "RoleReady", "OwnershipMarkChanged").await;
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Conflict);
    let message = cond(&t, "RoleReady").2;
    let note = wait_event(&ns, "acme", "Warning", "OwnershipMarkChanged").await;
    assert_eq!(note, message);
    reconciles(&ctl, 3).await;
    assert_eq!(
        role_comment(&pg, &acme).await.as_deref(),
        Some("hand made"),
        "marked again by the operator"
    );
    // The message's statement restores it.
    let restore = message
        .split_once("restore the mark: ")
        .map(|(_, sql)| sql.to_string())
        .unwrap_or_else(|| panic!("no restore statement: {message}"));
    assert!(
        restore.starts_with(&format!("COMMENT ON ROLE \"{acme}\" IS '")),
        "{restore}"
    );
    by_hand(&pg, &restore).await;
    touch(&ns, "acme", "restored").await;
    wait_ready(&ns, "acme").await;

    // The schema's mark changed to the other Tenant's.
    let globex_mark = schema_comment(&pg, &globex).await.unwrap();
    by_hand(
        &pg,
        &format!(
            "COMMENT ON SCHEMA \"{acme}\" IS '{}'",
            globex_mark.replace('\'', "''")
        ),
    )
    .await;
    let t = wait_reason(&ns, "acme", "SchemaReady", "OwnershipMarkChanged").await;
    let message = cond(&t, "SchemaReady").2;
    assert!(
        message.contains(&format!("Tenant {}/globex", ns.name)),
        "{message}"
    );
    reconciles(&ctl, 3).await;
    assert_eq!(schema_comment(&pg, &acme).await, Some(globex_mark.clone()));
    assert!(ns.tenants().get("globex").await.unwrap().is_ready());

    // Deleted with Delete: the schema is not this Tenant's any more, so neither it nor the
    // owner role that owns it is dropped; the app role (still marked) is.
    delete_tenant(&ns, "acme").await;
    wait_gone(&ns, "acme").await;
    assert!(
        schema_exists(&pg, &acme).await,
        "an unmarked schema was dropped"
    );
    assert_eq!(members(&pg, &acme).await, 1, "its data is kept");
    assert!(
        role_exists(&pg, &owner).await,
        "the owner of an unmarked schema was dropped"
    );
    assert!(!role_exists(&pg, &acme).await, "the marked app role stays");
    let note = wait_event(&ns, "acme", "Warning", "KeptUnmarked").await;
    assert!(
        note.contains(&format!("schema {acme}")) && note.contains(&format!("owner role {owner}")),
        "{note}"
    );
    let note = wait_event(&ns, "acme", "Normal", "Deleted").await;
    assert_eq!(note, format!("dropped role {acme}"));
    assert!(ns.tenants().get("globex").await.unwrap().is_ready());
    assert_eq!(schema_comment(&pg, &globex).await, Some(globex_mark));

    // Retain, with the app role's mark removed: the login is not locked (it is not this
    // Tenant's to lock any more), and said so.
    by_hand(&pg, &format!("COMMENT ON ROLE \"{globex}\" IS NULL")).await;
    let t = wait_reason(&ns, "globex", "RoleReady", "OwnershipMarkChanged").await;
    assert!(
        cond(&t, "RoleReady").2.contains("removed"),
        "{:?}",
        cond(&t, "RoleReady")
    );
    delete_tenant(&ns, "globex").await;
    wait_gone(&ns, "globex").await;
    let note = wait_event(&ns, "globex", "Warning", "KeptUnmarked").await;
    assert!(
        note.contains(&format!("role {globex} was not locked")),
        "{note}"
    );
    let can_login: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&globex)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert!(can_login, "an unmarked role was altered");
    assert!(schema_exists(&pg, &globex).await);

    // What was kept is the administrator's now; this test cleans up after itself.
    for schema in [&acme, &globex] {
        let owner = format!("{schema}_owner");
        by_hand(
            &pg,
            &format!(
                "DROP SCHEMA \"{schema}\" CASCADE; DROP OWNED BY \"{owner}\"; DROP ROLE \"{owner}\""
            ),
        )
        .await;
    }
    by_hand(
        &pg,
        &format!("DROP OWNED BY \"{globex}\"; DROP ROLE \"{globex}\""),
    )
    .await;
}
