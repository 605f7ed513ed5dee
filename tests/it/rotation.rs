//! Credential rotation without downtime: the Secret alternates between the app role and
//! `<schema>_b` with a fresh password, the previous login works for the grace period and is
//! then retired; clients that follow the Secret, a pool of short-lived connections and the API
//! see no failure through 20 rotations; never more than two logins; nothing left behind after
//! deletion; suspension covers both logins; a rotation interrupted between the Secret and the
//! status is recorded, not repeated. With a superuser admin and with a CREATEROLE-only one.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::http::{Method, StatusCode};
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tenantry::domain::crd::{CredentialsStatus, Phase, Tenant};

use crate::{
    api::{token_with, wait_routable, Api},
    common::*,
    suspend::createrole_admin,
};

/// The tenant's record of its logins.
fn record(t: &Tenant) -> Option<CredentialsStatus> {
    t.status.as_ref()?.credentials.clone()
}

async fn annotate_rotate(ns: &TestNs, name: &str, value: &str) {
    ns.tenants()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"tenantry.dev/rotate": value}}})),
        )
        .await
        .unwrap();
}

/// The error of a failed login, or `None` when it logs in.
async fn login_error(uri: &str) -> Option<String> {
    PgConnection::connect(uri)
        .await
        .err()
        .map(|e| e.to_string())
}

/// How many of `roles` may log in.
async fn logins(pg: &PgPool, roles: &[&str]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[]) AND rolcanlogin",
    )
    .bind(roles)
    .fetch_one(pg)
    .await
    .unwrap()
}

/// Every role carrying the ownership mark of Tenant `ns/name`, with whether it may log in.
async fn marked_roles(pg: &PgPool, ns: &str, name: &str) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles
          WHERE shobj_description(oid, 'pg_authid')::jsonb @> jsonb_build_object(
                  'managedBy', 'tenantry', 'namespace', $1::text, 'name', $2::text)
          ORDER BY 1",
    )
    .bind(ns)
    .bind(name)
    .fetch_all(pg)
    .await
    .unwrap()
}

/// Watches the tenant's logins every 50 ms until dropped: the most that could log in at once,
/// and how long two could (the overlap) each time.
struct LoginMonitor {
    max: Arc<AtomicU64>,
    overlaps: Arc<Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LoginMonitor {
    fn start(pg: PgPool, roles: Vec<String>) -> Self {
        let max = Arc::new(AtomicU64::new(0));
        let overlaps = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, o, s) = (max.clone(), overlaps.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let names: Vec<&str> = roles.iter().map(String::as_str).collect();
            let mut since: Option<Instant> = None;
            while !s.load(Ordering::SeqCst) {
                let n = logins(&pg, &names).await as u64;
                m.fetch_max(n, Ordering::SeqCst);
                match (n >= 2, since) {
                    (true, None) => since = Some(Instant::now()),
                    (false, Some(t)) => {
                        o.lock().unwrap().push(t.elapsed());
                        since = None;
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self {
            max,
            overlaps,
            stop,
            task,
        }
    }

    async fn finish(self) -> (u64, Vec<Duration>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let overlaps = self.overlaps.lock().unwrap().clone();
        (self.max.load(Ordering::SeqCst), overlaps)
    }
}

/// Waits until the tenant's record satisfies `pred`.
async fn wait_record(
    ns: &TestNs,
    name: &str,
    what: &str,
    pred: impl Fn(&CredentialsStatus) -> bool + Send + 'static,
) -> CredentialsStatus {
    let t = wait_tenant(ns, name, what, move |t| record(t).is_some_and(|r| pred(&r))).await;
    record(&t).unwrap()
}

fn ts(s: &str) -> k8s_openapi::jiff::Timestamp {
    s.parse().unwrap()
}

// --- 1. On demand -------------------------------------------------------------------------

async fn on_demand(ns: TestNs, opts: ControllerOpts) {
    let pg = pg().await;
    let _ctl = RunningController::start_with(&ns, opts).await;
    ns.create(Tenant::test("acme").with_rotation(None, Some("8s")))
        .await;
    let t = wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    let first = record(&t).expect("status.credentials from the first issue");
    assert_eq!(first.identity, schema);
    assert_eq!(first.previous_identity, None);
    let s0 = ns.secrets().get("acme-db").await.unwrap();
    let uri_a = secret_value(&s0, "uri");
    let mut session_a = PgConnection::connect(&uri_a).await.unwrap();
    session_a
        .execute("INSERT INTO members (email, display_name) VALUES ('a@x.io', 'A')")
        .await
        .unwrap();

    // Rotate on demand.
    annotate_rotate(&ns, "acme", "1").await;
    let r = wait_record(&ns, "acme", "rotated to _b", {
        let b = b.clone();
        move |r| r.identity == b
    })
    .await;
    assert_eq!(r.previous_identity.as_deref(), Some(schema.as_str()));
    assert_eq!(r.rotate_request.as_deref(), Some("1"));
    let until = ts(r.previous_valid_until.as_deref().unwrap());
    let grace = until.duration_since(ts(&r.rotated_at));
    assert_eq!(grace.as_secs(), 8, "{r:?}");
    let s1 = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(secret_value(&s1, "username"), b);
    assert_eq!(secret_value(&s1, "schema"), schema);
    assert_ne!(secret_value(&s1, "password"), secret_value(&s0, "password"));
    assert_eq!(
        secret_value(&s1, "jwt-key"),
        secret_value(&s0, "jwt-key"),
        "the token key is not the password"
    );
    let uri_b = secret_value(&s1, "uri");
    // The new login has the app role's rights, in its schema, and nothing more.
    let mut session_b = PgConnection::connect(&uri_b).await.unwrap();
    let (user, n): (String, i64) =
        sqlx::query_as("SELECT current_user::text, (SELECT count(*) FROM members)")
            .fetch_one(&mut session_b)
            .await
            .unwrap();
    assert_eq!((user.as_str(), n), (b.as_str(), 1));
    // The tenant, logged in as the second login, tries what its membership might allow.
    let owner = format!("{schema}_owner");
    let gw = gateway_role(&ns);
    for attack in [
        "CREATE TABLE planted (id int)".to_string(),
        format!("ALTER ROLE \"{b}\" CONNECTION LIMIT -1"),
        format!("ALTER ROLE \"{b}\" CREATEROLE"),
        format!("ALTER ROLE \"{schema}\" LOGIN"),
        format!("GRANT \"{schema}\" TO \"{gw}\""),
        format!("GRANT \"{b}\" TO \"{gw}\""),
        format!("SET ROLE \"{owner}\""),
        format!("SET ROLE \"{gw}\""),
        format!("DROP ROLE \"{schema}\""),
        "CREATE ROLE stray LOGIN".to_string(),
        "SELECT count(*) FROM tenantry_migrations".to_string(),
    ] {
        let r = session_b.execute(attack.as_str()).await;
        assert!(r.is_err(), "the second login may: {attack}");
    }
    // The JDBC URI names the new login too.
    assert!(secret_value(&s1, "jdbc-uri").contains(&format!("&user={}&", b.replace('_', "%5F"))));
    // The previous login still works during the grace period; two logins at most.
    assert_eq!(
        login_error(&uri_a).await,
        None,
        "old password refused early"
    );
    assert_eq!(logins(&pg, &[&schema, &b]).await, 2);

    // Tamper repair during the grace period follows the current login: the username put back
    // to the previous login is repaired to the new one, keeping its password.
    let mut tampered = s1.clone();
    tampered
        .data
        .as_mut()
        .unwrap()
        .insert("username".into(), ByteString(schema.clone().into_bytes()));
    tampered.metadata.managed_fields = None;
    ns.secrets()
        .replace("acme-db", &Default::default(), &tampered)
        .await
        .unwrap();
    let secrets = ns.secrets();
    let want_user = b.clone();
    let repaired = eventually("Secret repaired", Duration::from_secs(30), move || {
        let secrets = secrets.clone();
        let want_user = want_user.clone();
        async move {
            let s = secrets.get("acme-db").await.ok()?;
            (secret_value(&s, "username") == want_user).then_some(s)
        }
    })
    .await;
    assert_eq!(
        secret_value(&repaired, "password"),
        secret_value(&s1, "password"),
        "the repair reset the current password"
    );
    assert_eq!(login_error(&uri_b).await, None);

    // After the grace period: retired.
    let r = wait_record(&ns, "acme", "previous retired", |r| {
        r.previous_identity.is_none()
    })
    .await;
    assert_eq!(r.identity, b);
    let now = k8s_openapi::jiff::Timestamp::now();
    assert!(now >= until, "retired before {until}");
    let refused = login_error(&uri_a).await;
    assert!(refused.is_some(), "the old password still logs in");
    let ended = session_a.execute("SELECT 1").await;
    assert!(ended.is_err(), "the old login's session survived");
    assert_eq!(logins(&pg, &[&schema, &b]).await, 1);
    // The app role lost LOGIN: the second login keeps its rights through membership, and the
    // API (whose gateway switches to the app role) keeps serving.
    session_b
        .execute("INSERT INTO members (email, display_name) VALUES ('b@x.io', 'B')")
        .await
        .unwrap();
    let api = Api::start(&ns, Some(&ns.name)).await;
    let key = secret_value(&s1, "jwt-key");
    let tok = token_with("acme", key.as_bytes(), 300);
    wait_routable(&api, "acme", &tok).await;
    let auth = format!("Bearer {tok}");
    let (status, body, _) = api
        .call(
            Method::GET,
            "/v1/tables/members",
            &[("x-tenant", "acme"), ("authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
    // The gateway is never a member of the second login.
    let gw_member: bool =
        sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER') OR pg_has_role($1, $2, 'USAGE')")
            .bind(gateway_role(&ns))
            .bind(&b)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert!(!gw_member);

    // Rotating again goes back to the app role, with a password it never had.
    annotate_rotate(&ns, "acme", "2").await;
    let r = wait_record(&ns, "acme", "back to the app role", {
        let schema = schema.clone();
        move |r| r.identity == schema
    })
    .await;
    assert_eq!(r.previous_identity.as_deref(), Some(b.as_str()));
    let s2 = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(secret_value(&s2, "username"), schema);
    assert_eq!(login_error(&secret_value(&s2, "uri")).await, None);
    assert!(
        login_error(&uri_a).await.is_some(),
        "the first password came back"
    );
    let reasons: Vec<String> = events(&ns, "acme").await.into_iter().map(|e| e.1).collect();
    // (Repeated Events of one reason are one series for the recorder: count them by kind.)
    assert!(
        reasons.iter().any(|r| r == "CredentialsRotated"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "PreviousCredentialsRetired"),
        "{reasons:?}"
    );
    let t = ns.tenants().get("acme").await.unwrap();
    assert!(t.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_rotation_with_a_superuser_admin() {
    let ns = TestNs::new().await;
    on_demand(ns, ControllerOpts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_rotation_with_a_createrole_admin() {
    let ns = TestNs::new().await;
    let url = createrole_admin(&ns).await;
    on_demand(
        ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
    )
    .await;
}

// --- 2. Acceptance: load through rotations ------------------------------------------------

/// The scaled-down timings: grace 3 min → 5 s, rotations 2 min apart → 8 s, pool connections
/// living 60 s → 1 s, the kubelet's Secret refresh → 0.5 s. The grace period must cover how
/// long a client may keep an outdated Secret (a refresh round is reported; on a loaded 2-core
/// machine one read of the Secret can take seconds), hence the margin.
const LOAD_GRACE: &str = "5s";
const LOAD_PERIOD: &str = "8s";
const POOL_LIFETIME: Duration = Duration::from_millis(1000);
const SECRET_REFRESH: Duration = Duration::from_millis(500);
/// Requests per second each client aims at, spread over WORKERS concurrent workers (more
/// workers only add load on a machine that is CPU-bound already).
const RATE: u64 = 50;
const WORKERS: u64 = 3;

#[derive(Default)]
struct Count {
    ok: AtomicU64,
    failed_logins: AtomicU64,
    failed_requests: AtomicU64,
    /// How often a new connection logged in as another identity than the one before.
    switches: AtomicU64,
    last_user: Mutex<String>,
}

impl Count {
    /// Counts identity switches as seen by worker 0 (the others would interleave).
    fn logged_in_as(&self, worker: u64, user: &str) {
        if worker != 0 {
            return;
        }
        let mut last = self.last_user.lock().unwrap();
        if !last.is_empty() && *last != user {
            self.switches.fetch_add(1, Ordering::SeqCst);
        }
        *last = user.to_string();
    }

    fn get(&self) -> (u64, u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed_logins.load(Ordering::SeqCst),
            self.failed_requests.load(Ordering::SeqCst),
        )
    }
}

fn is_auth_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => matches!(d.code().as_deref(), Some("28P01" | "28000")),
        _ => false,
    }
}

async fn load(ns: TestNs, opts: ControllerOpts, rotations: usize) {
    let pg = pg().await;
    let _ctl = RunningController::start_with(&ns, opts).await;
    let mut tenant = Tenant::test("acme").with_rotation(Some(LOAD_PERIOD), Some(LOAD_GRACE));
    // The API workers' requests overlap: above the test API's default fair share of 1.
    tenant.spec.api.max_concurrency = Some(WORKERS as u32 + 1);
    ns.create(tenant).await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    let s0 = ns.secrets().get("acme-db").await.unwrap();
    PgConnection::connect(&secret_value(&s0, "uri"))
        .await
        .unwrap()
        .execute("INSERT INTO members (email, display_name) VALUES ('a@x.io', 'A')")
        .await
        .unwrap();
    let api = Api::start(&ns, Some(&ns.name)).await;
    let tok = token_with("acme", secret_value(&s0, "jwt-key").as_bytes(), 3600);
    wait_routable(&api, "acme", &tok).await;

    let monitor = LoginMonitor::start(pg.clone(), vec![schema.clone(), b.clone()]);
    // What a kubelet would show a pod: the Secret, refreshed every SECRET_REFRESH.
    let mounted = Arc::new(Mutex::new((
        secret_value(&s0, "username"),
        secret_value(&s0, "uri"),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    // The longest a client could have used an outdated Secret: the longest refresh round.
    let stale_max = Arc::new(Mutex::new(Duration::ZERO));
    let refresher = {
        let (secrets, mounted, stop, stale_max) = (
            ns.secrets(),
            mounted.clone(),
            stop.clone(),
            stale_max.clone(),
        );
        tokio::spawn(async move {
            let mut round = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let got = secrets.get("acme-db").await;
                {
                    let mut m = stale_max.lock().unwrap();
                    *m = (*m).max(round.elapsed());
                }
                round = Instant::now();
                if let Ok(s) = got {
                    *mounted.lock().unwrap() =
                        (secret_value(&s, "username"), secret_value(&s, "uri"));
                }
                tokio::time::sleep(SECRET_REFRESH).await;
            }
        })
    };
    let (direct, pooled, via_api) = (
        Arc::new(Count::default()),
        Arc::new(Count::default()),
        Arc::new(Count::default()),
    );

    // (a) Connects per request with the Secret as mounted; on an authentication failure
    // (counted) re-reads it from the apiserver and tries once more.
    let client_a = (0..WORKERS).map(|w| {
        let (mounted, stop, count, secrets) =
            (mounted.clone(), stop.clone(), direct.clone(), ns.secrets());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 * WORKERS / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (user, uri) = mounted.lock().unwrap().clone();
                let conn = match PgConnection::connect(&uri).await {
                    Ok(c) => {
                        count.logged_in_as(w, &user);
                        Ok(c)
                    }
                    Err(e) if is_auth_failure(&e) => {
                        count.failed_logins.fetch_add(1, Ordering::SeqCst);
                        let s = secrets.get("acme-db").await.unwrap();
                        PgConnection::connect(&secret_value(&s, "uri")).await
                    }
                    Err(e) => Err(e),
                };
                let Ok(mut conn) = conn else {
                    count.failed_requests.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM members")
                    .fetch_one(&mut conn)
                    .await
                {
                    Ok(_) => count.ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => count.failed_requests.fetch_add(1, Ordering::SeqCst),
                };
                let _ = conn.close().await;
            }
        })
    });
    let client_a: Vec<_> = client_a.collect();

    // (b) A pool of 3 connections per worker, each living POOL_LIFETIME, opened with the
    // Secret as mounted at the time.
    let client_b = (0..WORKERS).map(|w| {
        let (mounted, stop, count) = (mounted.clone(), stop.clone(), pooled.clone());
        tokio::spawn(async move {
            let mut pool: Vec<Option<(PgConnection, Instant)>> = (0..3).map(|_| None).collect();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 * WORKERS / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                i = (i + 1) % pool.len();
                if pool[i]
                    .as_ref()
                    .is_none_or(|(_, born)| born.elapsed() >= POOL_LIFETIME)
                {
                    if let Some((old, _)) = pool[i].take() {
                        let _ = old.close().await;
                    }
                    let (user, uri) = mounted.lock().unwrap().clone();
                    match PgConnection::connect(&uri).await {
                        Ok(c) => {
                            count.logged_in_as(w, &user);
                            pool[i] = Some((c, Instant::now()));
                        }
                        Err(e) => {
                            if is_auth_failure(&e) {
                                count.failed_logins.fetch_add(1, Ordering::SeqCst);
                            }
                            count.failed_requests.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    }
                }
                let (conn, _) = pool[i].as_mut().unwrap();
                match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM members")
                    .fetch_one(conn)
                    .await
                {
                    Ok(_) => count.ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => {
                        pool[i] = None;
                        count.failed_requests.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        })
    });
    let client_b: Vec<_> = client_b.collect();

    // (c) The API, from WORKERS workers in this task, while the driver runs until
    // `rotations` rotations happened and the last previous login was retired.
    let started = Instant::now();
    let auth = format!("Bearer {tok}");
    let api_worker = || async {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 * WORKERS / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let (status, body, _) = api
                .call(
                    Method::GET,
                    "/v1/tables/members",
                    &[("x-tenant", "acme"), ("authorization", &auth)],
                    None,
                )
                .await;
            if status == StatusCode::OK {
                via_api.ok.fetch_add(1, Ordering::SeqCst);
            } else {
                eprintln!("API answered {status}: {body}");
                via_api.failed_requests.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let driver = async {
        let mut seen: Vec<String> = Vec::new();
        let deadline = Duration::from_secs(60 + 15 * rotations as u64);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let t = ns.tenants().get("acme").await.unwrap();
            let r = record(&t).unwrap();
            if !seen.contains(&r.rotated_at) {
                seen.push(r.rotated_at.clone());
            }
            // The first entry is the first issue.
            if seen.len() > rotations && r.previous_identity.is_none() {
                break;
            }
            if started.elapsed() > deadline {
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        seen
    };
    let (seen, _) = futures::join!(
        driver,
        futures::future::join_all((0..WORKERS).map(|_| api_worker()))
    );
    assert!(
        seen.len() > rotations,
        "only {} rotations after {:?}",
        seen.len() - 1,
        started.elapsed()
    );
    let elapsed = started.elapsed();
    for task in client_a.into_iter().chain(client_b).chain([refresher]) {
        task.await.unwrap();
    }
    let (max_logins, overlaps) = monitor.finish().await;
    let secs = elapsed.as_secs_f64();
    let report = |name: &str, c: &Count| {
        let (ok, logins, failed) = c.get();
        eprintln!(
            "rotation load: {name}: {ok} ok ({:.1} req/s), {logins} failed logins, {failed} failed requests, \
             {} identity switches",
            ok as f64 / secs,
            c.switches.load(Ordering::SeqCst)
        );
        (ok, logins, failed)
    };
    let a = report("(a) connect per request, re-read on auth failure", &direct);
    let b_ = report("(b) pool, 1 s connection lifetime", &pooled);
    let c = report("(c) API", &via_api);
    let ov: Vec<f64> = overlaps.iter().map(Duration::as_secs_f64).collect();
    eprintln!(
        "rotation load: longest Secret refresh round (client staleness bound): {:?}",
        *stale_max.lock().unwrap()
    );
    eprintln!(
        "rotation load: {} rotations in {secs:.1} s; max {max_logins} logins at once; overlap (two logins) \
         {} times, min {:.2} s, mean {:.2} s, max {:.2} s (grace {LOAD_GRACE})",
        seen.len() - 1,
        ov.len(),
        ov.iter().cloned().fold(f64::INFINITY, f64::min),
        ov.iter().sum::<f64>() / ov.len().max(1) as f64,
        ov.iter().cloned().fold(0.0, f64::max),
    );
    for (name, (ok, logins, failed)) in [("a", a), ("b", b_), ("c", c)] {
        assert_eq!((logins, failed), (0, 0), "client ({name}) failed");
        // Requests throughout: several per rotation at least, whatever the machine's load.
        assert!(
            ok as usize >= 5 * rotations,
            "client ({name}) managed only {ok} requests in {secs:.1} s"
        );
    }
    assert!(max_logins <= 2, "{max_logins} logins at once");
    // The clients followed the Secret through the rotations (a client slowed down by a busy
    // machine may sleep through an identity when rotations come back to back).
    for (name, c) in [("a", &direct), ("b", &pooled)] {
        let switches = c.switches.load(Ordering::SeqCst) as usize;
        assert!(
            switches * 2 >= rotations,
            "client ({name}) switched identity {switches} times in {rotations} rotations"
        );
    }
    // Every rotation opens an overlap; sampled every 50 ms, back-to-back rotations on a loaded
    // machine can read as one (the previous login retires as the next one appears), so only
    // half are required here — what must hold always is above: no failed login, no failed
    // request, never more than two logins.
    assert!(
        ov.len() * 2 >= rotations,
        "the monitor saw {} overlaps for {rotations} rotations",
        ov.len()
    );
    // Periodic rotation off; after the last grace period only the current login works.
    ns.tenants()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"credentials": {"rotationPeriod": null}}})),
        )
        .await
        .unwrap();
    wait_tenant(&ns, "acme", "period off, previous retired", |t| {
        t.status.as_ref().and_then(|s| s.observed_generation) == t.metadata.generation
            && record(t).is_some_and(|r| r.previous_identity.is_none())
    })
    .await;
    let s = ns.secrets().get("acme-db").await.unwrap();
    let current = secret_value(&s, "username");
    assert_eq!(logins(&pg, &[&schema, &b]).await, 1);
    let can: bool = sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
        .bind(&current)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert!(can);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_the_api_see_no_failure_through_20_rotations() {
    let ns = TestNs::new().await;
    load(ns, ControllerOpts::default(), 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_no_failure_through_rotations_with_a_createrole_admin() {
    let ns = TestNs::new().await;
    let url = createrole_admin(&ns).await;
    load(
        ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
        6,
    )
    .await;
}

// --- 3. Deletion after rotations ----------------------------------------------------------

async fn rotate_and_wait_retired(ns: &TestNs, name: &str, value: &str) -> CredentialsStatus {
    annotate_rotate(ns, name, value).await;
    let v = value.to_string();
    wait_record(ns, name, "rotated and retired", move |r| {
        r.rotate_request.as_deref() == Some(v.as_str()) && r.previous_identity.is_none()
    })
    .await
}

async fn deletion(ns: TestNs, opts: ControllerOpts) {
    let pg = pg().await;
    let _ctl = RunningController::start_with(&ns, opts).await;
    ns.create(Tenant::test("keep").with_rotation(None, Some("1s")))
        .await;
    ns.create(
        Tenant::test("drop")
            .with_rotation(None, Some("1s"))
            .deleting(),
    )
    .await;
    wait_ready(&ns, "keep").await;
    wait_ready(&ns, "drop").await;
    let all: Vec<String> = ["keep", "drop"]
        .iter()
        .flat_map(|t| {
            let s = ns.schema(t);
            [s.clone(), format!("{s}_b")]
        })
        .collect();
    let monitor = LoginMonitor::start(pg.clone(), all.clone());
    // Three rotations each: the Secret ends on the second login.
    for v in ["1", "2", "3"] {
        for t in ["keep", "drop"] {
            let r = rotate_and_wait_retired(&ns, t, v).await;
            let b = format!("{}_b", ns.schema(t));
            let want = if v == "2" { ns.schema(t) } else { b };
            assert_eq!(r.identity, want);
        }
    }
    for t in ["keep", "drop"] {
        let marked = marked_roles(&pg, &ns.name, t).await;
        let s = ns.schema(t);
        assert_eq!(
            marked,
            vec![
                (s.clone(), false),
                (format!("{s}_b"), true),
                (format!("{s}_owner"), false)
            ],
            "{t}"
        );
    }
    delete_tenant(&ns, "keep").await;
    delete_tenant(&ns, "drop").await;
    wait_gone(&ns, "keep").await;
    wait_gone(&ns, "drop").await;
    let (max, _) = monitor.finish().await;
    // Two tenants: at most two logins each, at most four in all; each tenant checked below.
    assert!(max <= 4, "{max}");
    // Retain keeps the app and owner roles (no login), and the schema; the second login goes.
    let s = ns.schema("keep");
    assert_eq!(
        marked_roles(&pg, &ns.name, "keep").await,
        vec![(s.clone(), false), (format!("{s}_owner"), false)]
    );
    let schema_kept: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&s)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert!(schema_kept);
    // Delete leaves nothing.
    assert_eq!(marked_roles(&pg, &ns.name, "drop").await, vec![]);
    let s = ns.schema("drop");
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = $1)
              + (SELECT count(*) FROM pg_roles WHERE rolname IN ($1, $1 || '_b', $1 || '_owner'))",
    )
    .bind(&s)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_rotations_with_a_superuser_admin() {
    let ns = TestNs::new().await;
    deletion(ns, ControllerOpts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_rotations_with_a_createrole_admin() {
    let ns = TestNs::new().await;
    let url = createrole_admin(&ns).await;
    deletion(
        ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
    )
    .await;
}

// --- 4. Suspension during a rotation ------------------------------------------------------

async fn suspend_patch(ns: &TestNs, value: serde_json::Value) {
    ns.tenants()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspended": value}})),
        )
        .await
        .unwrap();
}

async fn suspension(ns: TestNs, opts: ControllerOpts) {
    let pg = pg().await;
    let _ctl = RunningController::start_with(&ns, opts).await;
    ns.create(Tenant::test("acme").with_rotation(None, Some("20s")))
        .await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    let uri_a = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    annotate_rotate(&ns, "acme", "1").await;
    wait_record(&ns, "acme", "rotated", {
        let b = b.clone();
        move |r| r.identity == b && r.previous_identity.is_some()
    })
    .await;
    let uri_b = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    let mut session_a = PgConnection::connect(&uri_a).await.unwrap();
    let mut session_b = PgConnection::connect(&uri_b).await.unwrap();

    // Suspended in the grace period: both logins NOLOGIN, both sessions ended.
    suspend_patch(&ns, json!(true)).await;
    wait_tenant(&ns, "acme", "suspended", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Suspended)
    })
    .await;
    assert_eq!(logins(&pg, &[&schema, &b]).await, 0);
    assert!(session_a.execute("SELECT 1").await.is_err());
    assert!(session_b.execute("SELECT 1").await.is_err());
    assert!(login_error(&uri_a).await.is_some());
    assert!(login_error(&uri_b).await.is_some());
    // No rotation while suspended.
    annotate_rotate(&ns, "acme", "2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = ns.tenants().get("acme").await.unwrap();
    assert_eq!(record(&t).unwrap().identity, b);
    assert_eq!(logins(&pg, &[&schema, &b]).await, 0);

    // Resumed: the current login works again; the waiting request rotates once the previous
    // login's grace period is over, back to the app role.
    suspend_patch(&ns, serde_json::Value::Null).await;
    wait_ready(&ns, "acme").await;
    assert_eq!(login_error(&uri_b).await, None);
    let r = wait_record(&ns, "acme", "request 2 answered", |r| {
        r.rotate_request.as_deref() == Some("2")
    })
    .await;
    assert_eq!(r.identity, schema);
    assert!(logins(&pg, &[&schema, &b]).await <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_covers_both_logins_with_a_superuser_admin() {
    let ns = TestNs::new().await;
    suspension(ns, ControllerOpts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_covers_both_logins_with_a_createrole_admin() {
    let ns = TestNs::new().await;
    let url = createrole_admin(&ns).await;
    suspension(
        ns,
        ControllerOpts {
            database_url: url,
            ..ControllerOpts::default()
        },
    )
    .await;
}

// --- 5. Crash between the Secret and the status --------------------------------------------

/// The operator stopped after a rotation wrote the Secret and before it wrote the status: the
/// next operator records the rotation as it happened instead of doing another one, and the
/// Secret's password stays valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_interrupted_before_its_status_is_recorded_not_repeated() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_rotation(None, Some("1s")))
        .await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    // Two rotations: the second login exists, retired; the Secret holds the app role.
    rotate_and_wait_retired(&ns, "acme", "1").await;
    let r = rotate_and_wait_retired(&ns, "acme", "2").await;
    assert_eq!(r.identity, schema);
    drop(ctl);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // What the stopped rotation had done: the second login got a password and LOGIN, the
    // Secret was written for it; the status still says the app role.
    let password = random_suffix() + &random_suffix() + "Xy1";
    pg.execute(format!("ALTER ROLE \"{b}\" LOGIN PASSWORD '{password}'").as_str())
        .await
        .unwrap();
    let mut s = ns.secrets().get("acme-db").await.unwrap();
    let enc = tenantry::domain::credentials::encode;
    let uri = secret_value(&s, "uri").replacen(
        &format!("{}:{}@", enc(&schema), enc(&secret_value(&s, "password"))),
        &format!("{}:{}@", enc(&b), enc(&password)),
        1,
    );
    assert!(uri.contains(&enc(&b)), "{uri}");
    let data = s.data.as_mut().unwrap();
    data.insert("username".into(), ByteString(b.clone().into_bytes()));
    data.insert("password".into(), ByteString(password.clone().into_bytes()));
    data.insert("uri".into(), ByteString(uri.clone().into_bytes()));
    let at = k8s_openapi::jiff::Timestamp::now().to_string();
    s.metadata.annotations = Some(
        [
            ("tenantry.dev/rotated-at".to_string(), at.clone()),
            ("tenantry.dev/rotate-request".to_string(), "3".to_string()),
        ]
        .into(),
    );
    s.metadata.managed_fields = None;
    ns.secrets()
        .replace("acme-db", &Default::default(), &Secret { ..s })
        .await
        .unwrap();
    assert_eq!(login_error(&uri).await, None);
    annotate_rotate(&ns, "acme", "3").await;

    let _ctl = RunningController::start(&ns).await;
    let r = wait_record(&ns, "acme", "the rotation recorded", {
        let b = b.clone();
        move |r| r.identity == b
    })
    .await;
    assert_eq!(r.rotate_request.as_deref(), Some("3"));
    // Recorded as it happened, from the Secret's annotation.
    assert_eq!(ts(&r.rotated_at), ts(&at));
    // Not rotated again: the Secret keeps the password, which keeps working after the grace
    // period of the previous login.
    wait_record(&ns, "acme", "previous retired", |r| {
        r.previous_identity.is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(secret_value(&s, "username"), b);
    assert_eq!(secret_value(&s, "password"), password);
    assert_eq!(login_error(&uri).await, None);
    assert_eq!(logins(&pg, &[&schema, &b]).await, 1);
    let t = ns.tenants().get("acme").await.unwrap();
    assert_eq!(record(&t).unwrap().identity, b);
    // The new operator said what it recorded.
    let notes: Vec<String> = events(&ns, "acme")
        .await
        .into_iter()
        .filter(|e| e.1 == "CredentialsRotated")
        .map(|e| e.2)
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("recorded the rotation")),
        "{notes:?}"
    );
}

// --- 6. A second login someone else holds ---------------------------------------------------

/// A rotation into `<schema>_b` held by a role tenantry did not make stops with a Conflict and
/// changes nothing: the Secret keeps working, the foreign role is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_name_held_by_someone_else_is_a_conflict_and_changes_nothing() {
    let ns = TestNs::new().await;
    let pg = pg().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_rotation(None, Some("1s")))
        .await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    pg.execute(format!("CREATE ROLE \"{b}\" NOLOGIN").as_str())
        .await
        .unwrap();
    let before = ns.secrets().get("acme-db").await.unwrap();
    annotate_rotate(&ns, "acme", "1").await;
    let t = wait_tenant(&ns, "acme", "Conflict", |t| {
        t.condition("CredentialsReady")
            .is_some_and(|c| c.status == "False" && c.reason == "Conflict")
    })
    .await;
    assert_eq!(t.status.as_ref().unwrap().phase, Phase::Conflict);
    let message = &t.condition("CredentialsReady").unwrap().message;
    assert!(
        message.contains(&b) && message.contains("not managed by tenantry"),
        "{message}"
    );
    assert_eq!(record(&t).unwrap().identity, schema);
    let after = ns.secrets().get("acme-db").await.unwrap();
    assert_eq!(after.data, before.data, "the Secret changed");
    assert_eq!(login_error(&secret_value(&after, "uri")).await, None);
    let (login, comment, members): (bool, Option<String>, i64) = sqlx::query_as(
        "SELECT r.rolcanlogin, shobj_description(r.oid, 'pg_authid'),
                (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)
           FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(&b)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(
        (login, comment, members),
        (false, None, 0),
        "the role was touched"
    );
    let warnings: Vec<String> = events(&ns, "acme")
        .await
        .into_iter()
        .filter(|e| e.0 == "Warning")
        .map(|e| e.1)
        .collect();
    assert!(warnings.iter().any(|r| r == "Conflict"), "{warnings:?}");

    // Once the name is free, the rotation goes through.
    pg.execute(format!("DROP ROLE \"{b}\"").as_str())
        .await
        .unwrap();
    // (A Conflict is looked at again every 5 minutes; a new request looks now.)
    annotate_rotate(&ns, "acme", "2").await;
    wait_record(&ns, "acme", "rotated", move |r| r.identity == b).await;
    wait_ready(&ns, "acme").await;
}

/// A spec change the operator refuses while the previous login is in its grace period: the
/// tenant keeps serving as provisioned, and the previous login is still retired on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_does_not_keep_the_previous_login_alive() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_rotation(None, Some("6s")))
        .await;
    wait_ready(&ns, "acme").await;
    let schema = ns.schema("acme");
    let b = format!("{schema}_b");
    let uri_a = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "uri");
    annotate_rotate(&ns, "acme", "1").await;
    let r = wait_record(&ns, "acme", "rotated to _b", {
        let b = b.clone();
        move |r| r.identity == b
    })
    .await;
    assert_eq!(r.previous_identity.as_deref(), Some(schema.as_str()));
    let mut session_a = PgConnection::connect(&uri_a).await.unwrap();
    // Now a change the operator must refuse (the 1.20 test apiserver admits it).
    ns.tenants()
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"credentials": {"template": {"URL": "{{ .nope }}"}}}})),
        )
        .await
        .unwrap();
    wait_tenant(&ns, "acme", "SpecAccepted=False", |t| {
        t.condition("SpecAccepted")
            .is_some_and(|c| c.status == "False")
    })
    .await;
    // Past the grace: the previous login is retired all the same.
    let r = wait_record(&ns, "acme", "previous login retired", |r| {
        r.previous_identity.is_none()
    })
    .await;
    assert_eq!(r.identity, b);
    let err = login_error(&uri_a).await.expect("the old password fails");
    assert!(err.contains("password") || err.contains("login"), "{err}");
    assert!(
        session_a.execute("SELECT 1").await.is_err(),
        "its open session was ended"
    );
    let t = ns.tenants().get("acme").await.unwrap();
    assert_eq!(t.condition("SpecAccepted").unwrap().status, "False");
    assert_eq!(t.condition("Ready").unwrap().status, "True");
    assert!(events(&ns, "acme")
        .await
        .iter()
        .any(|e| e.1 == "PreviousCredentialsRetired"));
}
