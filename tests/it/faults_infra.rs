//! Infrastructure faults, with the operator (`tenantry controller`) and the API (`tenantry api`)
//! running as processes: PostgreSQL stopped in immediate mode and started again during
//! provisioning and under API load, and the kube-apiserver killed and started again during
//! provisioning. These restart servers, so they run on a stack of this module's own
//! (`scripts/stack.sh`), one test at a time. The API's pool exhausted by slow queries restarts
//! nothing and runs on the shared stack.
//!
//! Each test prints what it measured (`cargo test … -- --nocapture` shows it).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use sqlx::{postgres::PgPoolOptions, Connection, PgConnection, PgPool};
use tenantry::domain::{crd::Tenant, state::Owner};

use crate::{
    api::{gateway_uri, token_with},
    common::{stack::Stack, *},
    e2e::{http, http_get, spawn_logged},
};

static STACK: tokio::sync::OnceCell<Stack> = tokio::sync::OnceCell::const_new();

/// The stack of this module, started on first use, with the CRDs installed.
async fn own_stack() -> &'static Stack {
    STACK
        .get_or_init(|| async {
            let s = tokio::task::spawn_blocking(|| {
                let s = stack::start("tenantry-faults-");
                stack::install_crd(&s.kubeconfig);
                s
            })
            .await
            .unwrap();
            // A commit must survive an immediate-mode stop, as on any production server: the
            // stacks of the tests run with `synchronous_commit = off` for speed, which loses
            // the last commits of a crash (the operator would have reported a Tenant Ready
            // whose history table PostgreSQL then forgot).
            let pg = admin_pool(&s).await;
            sqlx::query("ALTER SYSTEM SET synchronous_commit = on")
                .execute(&pg)
                .await
                .unwrap();
            sqlx::query("SELECT pg_catalog.pg_reload_conf()")
                .execute(&pg)
                .await
                .unwrap();
            s
        })
        .await
}

/// [`own_stack`], once started.
fn started() -> &'static Stack {
    STACK.get().expect("the module's stack is started")
}

/// The tests that stop servers of [`own_stack`] take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
enum Server {
    Postgres,
    Apiserver,
}

/// A server of [`own_stack`] stopped. [`Outage::end`] starts it again; so does dropping it
/// when a test fails half-way, so that the next test finds it running.
struct Outage {
    server: Server,
    ended: bool,
}

impl Outage {
    async fn begin(server: Server) -> Self {
        tokio::task::spawn_blocking(move || match server {
            Server::Postgres => started().stop_postgres(),
            Server::Apiserver => started().stop_apiserver(),
        })
        .await
        .unwrap();
        Self {
            server,
            ended: false,
        }
    }

    /// Starts the server again; returns when it is ready.
    async fn end(mut self) -> Instant {
        let server = self.server;
        self.ended = true;
        tokio::task::spawn_blocking(move || start(server))
            .await
            .unwrap();
        Instant::now()
    }
}

fn start(server: Server) {
    match server {
        Server::Postgres => started().start_postgres(),
        Server::Apiserver => started().start_apiserver(),
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.ended {
            start(self.server);
        }
    }
}

/// A namespace on [`own_stack`].
async fn own_ns() -> TestNs {
    let s = own_stack().await;
    let client = tenantry::cli::kube_client(Some(&s.kubeconfig), None)
        .await
        .expect("kube client");
    TestNs::new_on(client, s.kubeconfig.clone()).await
}

/// `tenantry controller` for `ns` on `stack` with the demo migrations (so the API has tables
/// to serve), ready.
async fn operator(stack: &Stack, ns: &TestNs, extra: &[&str]) -> Proc {
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let kubeconfig = stack.kubeconfig.to_string_lossy().into_owned();
    let gateway = gateway_role(ns);
    let mut args = vec![
        "controller",
        "--demo-migrations",
        "--namespace",
        &ns.name,
        "--health-addr",
        &health,
        "--gateway-role",
        &gateway,
        "--gateway-secret-namespace",
        &ns.name,
        "--signing-key-secret-namespace",
        &ns.name,
    ];
    args.extend_from_slice(extra);
    let p = spawn_logged(
        &args,
        &[
            ("DATABASE_URL", &stack.database_url),
            ("KUBECONFIG", &kubeconfig),
            // Its TenantRollout in the test's namespace.
            ("POD_NAMESPACE", &ns.name),
        ],
        &format!("tenantry-faults-op-{}.log", ns.name),
    );
    eventually(
        "operator /readyz",
        Duration::from_secs(30),
        move || async move { http_get(port, "/readyz").await.filter(|(c, _)| *c == 200) },
    )
    .await;
    p
}

/// `tenantry api` for `ns`, logged in as the operator's gateway role, ready (its registry
/// synced). Returns the process and its tenant-traffic port.
async fn api_process(stack: &Stack, ns: &TestNs, extra: &[&str]) -> (Proc, u16) {
    let uri = gateway_uri(ns).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let kubeconfig = stack.kubeconfig.to_string_lossy().into_owned();
    let mut args = vec![
        "api",
        "--namespace",
        &ns.name,
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
        "--base-domain",
        BASE_DOMAIN,
        "--signing-key-secret-namespace",
        &ns.name,
    ];
    args.extend_from_slice(extra);
    let p = spawn_logged(
        &args,
        &[("DATABASE_URL", &uri), ("KUBECONFIG", &kubeconfig)],
        &format!("tenantry-faults-api-{}.log", ns.name),
    );
    eventually("api /readyz", Duration::from_secs(30), move || async move {
        http_get(port, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    (p, port)
}

/// A tenant's token, signed with the key from its Secret.
async fn tenant_token(ns: &TestNs, name: &str) -> String {
    let s = ns.secrets().get(&format!("{name}-db")).await.unwrap();
    token_with(name, secret_value(&s, "jwt-key").as_bytes(), 3600)
}

/// One answer of the API, or none (no connection, or no answer within the client's limit).
#[derive(Debug, Clone)]
struct Reply {
    /// 0 when there was no answer.
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
    started: Instant,
    took: Duration,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The problem kind (the last segment of `type`) of a problem+json answer.
    fn problem(&self) -> Option<String> {
        if self.headers.get("content-type").map(String::as_str) != Some("application/problem+json")
        {
            return None;
        }
        let v: Value = serde_json::from_str(&self.body).ok()?;
        (v["status"] == self.status).then_some(())?;
        v["type"]
            .as_str()?
            .strip_prefix("https://tenantry.dev/problems/")
            .map(str::to_string)
    }
}

/// Sends one request for `tenant` (by its host) with `token`, waiting at most `limit`.
async fn call(
    port: u16,
    method: &str,
    tenant: &str,
    token: &str,
    path: &str,
    body: Option<&str>,
    limit: Duration,
) -> Reply {
    let host = format!("{tenant}.{BASE_DOMAIN}");
    let auth = format!("Bearer {token}");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        limit,
        http(
            port,
            method,
            path,
            &[("Host", &host), ("Authorization", &auth)],
            body,
        ),
    )
    .await
    .ok()
    .flatten();
    let took = started.elapsed();
    let Some((status, text)) = answer else {
        return Reply {
            status: 0,
            headers: BTreeMap::new(),
            body: String::new(),
            started,
            took,
        };
    };
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
        started,
        took,
    }
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An admin pool on `stack`'s PostgreSQL.
async fn admin_pool(stack: &Stack) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(&stack.database_url)
        .await
        .expect("connect as the admin")
}

/// How many of `names` are Ready now.
async fn count_ready(ns: &TestNs, names: &[String]) -> usize {
    let Ok(list) = ns.tenants().list(&Default::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|t| {
            names
                .iter()
                .any(|n| Some(n.as_str()) == t.metadata.name.as_deref())
        })
        .filter(|t| t.is_ready())
        .count()
}

/// Waits until every one of `names` is Ready; returns how long that took.
async fn wait_all_ready(ns: &TestNs, names: &[String], timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let n = count_ready(ns, names).await;
        if n == names.len() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "only {n} of {} Tenants Ready after {timeout:?}",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What must hold for a fleet once converged: every Tenant of `names` has exactly its schema
/// and its two roles carrying its mark, nothing else in PostgreSQL carries a mark of the
/// namespace (no leftover), each schema applied migrations 1 to `version` exactly once, and
/// every Secret's password logs in as the tenant's role.
async fn assert_fleet(stack: &Stack, ns: &TestNs, names: &[String], version: i64) {
    let pg = admin_pool(stack).await;
    let schemas: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT nspname::text, pg_catalog.obj_description(oid, 'pg_namespace') FROM pg_catalog.pg_namespace",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    let roles: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT rolname::text, pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    let mut marked: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (object, comment, is_schema) in schemas
        .into_iter()
        .map(|(n, c)| (n, c, true))
        .chain(roles.into_iter().map(|(n, c)| (n, c, false)))
    {
        let Some(owner) = Owner::parse(comment.as_deref()) else {
            continue;
        };
        if owner.namespace != ns.name {
            continue;
        }
        let e = marked.entry(owner.name).or_default();
        if is_schema {
            e.0.push(object);
        } else {
            e.1.push(object);
        }
    }
    let want: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let leftovers: Vec<&String> = marked
        .keys()
        .filter(|k| !want.contains(k.as_str()))
        .collect();
    assert!(
        leftovers.is_empty(),
        "marked objects without a Tenant: {leftovers:?}"
    );
    for name in names {
        let schema = ns.schema(name);
        let (mut s, mut r) = marked.get(name).cloned().unwrap_or_default();
        s.sort();
        r.sort();
        assert_eq!(s, std::slice::from_ref(&schema), "schemas of {name}");
        assert_eq!(
            r,
            [schema.clone(), format!("{schema}_owner")],
            "roles of {name}"
        );
        let applied: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM \"{schema}\".tenantry_migrations ORDER BY version"
        ))
        .fetch_all(&pg)
        .await
        .unwrap();
        assert_eq!(
            applied,
            (1..=version).collect::<Vec<_>>(),
            "history of {name}"
        );
        let secret = ns.secrets().get(&format!("{name}-db")).await.unwrap();
        let mut conn = PgConnection::connect(&secret_value(&secret, "uri"))
            .await
            .unwrap_or_else(|e| panic!("{name}'s Secret does not log in: {e}"));
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(user, schema);
    }
}

/// PostgreSQL stopped in immediate mode while 20 Tenants are provisioned (at the first one
/// Ready, the operator working on 4 at a time), started again 2 s later: every Tenant
/// converges to Ready with exactly one schema and its roles, its migrations applied once, and
/// a Secret whose password logs in; nothing is left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_provisioning_converges() {
    let _turn = TURN.lock().await;
    let stack = own_stack().await;
    let ns = own_ns().await;
    let _op = operator(stack, &ns, &["--concurrency", "4"]).await;
    let names: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    for n in &names {
        ns.create(Tenant::test(n)).await;
    }
    let first = Instant::now();
    while count_ready(&ns, &names).await == 0 {
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "no Tenant became Ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outage = Outage::begin(Server::Postgres).await;
    let ready_at_crash = count_ready(&ns, &names).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outage.end().await;
    let converged = wait_all_ready(&ns, &names, Duration::from_secs(120)).await;
    eprintln!(
        "faults: PostgreSQL crashed with {ready_at_crash}/20 Tenants Ready, down 2 s; all Ready {:.1} s after it was back",
        converged.as_secs_f64()
    );
    assert!(
        ready_at_crash < names.len(),
        "the crash came after provisioning: it proves nothing"
    );
    assert_fleet(stack, &ns, &names, 2).await;
}

/// PostgreSQL stopped in immediate mode during a migration rollout (20 tenants, a new
/// migration that adds a column and takes 0.5 s; at the first tenant migrated) and started
/// again 2 s later: the rollout completes, every tenant has the column and its history lists
/// each migration exactly once (none half-migrated, none migrated twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_a_rollout_completes_it_once_per_tenant() {
    let _turn = TURN.lock().await;
    let stack = own_stack().await;
    let ns = own_ns().await;
    let dir = tempfile::tempdir().unwrap();
    let migrations = dir.path().to_string_lossy().into_owned();
    let _op = operator(
        stack,
        &ns,
        &[
            "--concurrency",
            "4",
            "--migrations-dir",
            &migrations,
            "--migrations-poll-secs",
            "1",
        ],
    )
    .await;
    let names: Vec<String> = (0..20).map(|i| format!("r{i:02}")).collect();
    for n in &names {
        ns.create(Tenant::test(n)).await;
    }
    wait_all_ready(&ns, &names, Duration::from_secs(90)).await;

    std::fs::write(
        dir.path().join("3_priority.sql"),
        "ALTER TABLE tasks ADD COLUMN priority int NOT NULL DEFAULT 0;\nSELECT pg_catalog.pg_sleep(0.5);\n",
    )
    .unwrap();
    let pg = admin_pool(stack).await;
    let schemas: Vec<String> = names.iter().map(|n| ns.schema(n)).collect();
    let migrated = |pg: PgPool, schemas: Vec<String>| async move {
        let mut n = 0;
        for s in &schemas {
            let v: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT max(version) FROM \"{s}\".tenantry_migrations"
            ))
            .fetch_one(&pg)
            .await
            .ok()?;
            n += usize::from(v == Some(3));
        }
        Some(n)
    };
    let first = Instant::now();
    loop {
        if migrated(pg.clone(), schemas.clone()).await.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "the rollout never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outage = Outage::begin(Server::Postgres).await;
    drop(pg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = outage.end().await;
    let pg = admin_pool(stack).await;
    // The migrated count just before the crash, read after: what PostgreSQL kept.
    let at_crash = migrated(pg.clone(), schemas.clone()).await.unwrap();
    let rollouts: kube::Api<tenantry::domain::rollout::TenantRollout> =
        kube::Api::namespaced(ns.client.clone(), &ns.name);
    let tenants = ns.tenants();
    eventually(
        "the rollout complete and every Tenant at version 3",
        Duration::from_secs(120),
        move || {
            let (rollouts, tenants) = (rollouts.clone(), tenants.clone());
            async move {
                let s = rollouts.get_opt("tenantry").await.ok()??.status?;
                let list = tenants.list(&Default::default()).await.ok()?;
                (s.completed_version == Some(3)
                    && list
                        .items
                        .iter()
                        .all(|t| t.status.as_ref().and_then(|s| s.migration_version) == Some(3)))
                .then_some(())
            }
        },
    )
    .await;
    let took = back.elapsed();
    let stored = ns.tenants().list(&Default::default()).await.unwrap();
    for t in &stored.items {
        assert_eq!(
            t.status.as_ref().and_then(|s| s.migration_version),
            Some(3),
            "{}",
            t.metadata.name.as_deref().unwrap_or_default()
        );
    }
    for s in &schemas {
        let has: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = 'tasks' AND a.attname = 'priority' AND NOT a.attisdropped)",
        )
        .bind(s)
        .fetch_one(&pg)
        .await
        .unwrap();
        assert!(has, "{s} lacks the column its history may list");
    }
    eprintln!(
        "faults: PostgreSQL crashed during a rollout with {at_crash}/20 tenants migrated, down 2 s; rollout complete {:.1} s after it was back",
        took.as_secs_f64()
    );
    assert!(
        at_crash < names.len(),
        "the crash came after the rollout: it proves nothing"
    );
    assert_fleet(stack, &ns, &names, 3).await;
}

/// The tenants of the load test: each one's rows are named `<tenant>:<n>`.
const LOADED: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];

/// The API's timeouts in the load test.
const ACQUIRE_MS: u64 = 1000;
const STATEMENT_MS: u64 = 2000;

/// PostgreSQL stopped in immediate mode for 3 s under API load (six tenants, each a client
/// reading and writing its own rows with its own token, four pool connections): while it is
/// down every answer is 503 problem+json `database-unavailable` or `pool-exhausted` with
/// Retry-After (or, for a POST caught on a connection that broke after it was sent, 502
/// `write-outcome-unknown` without it), none takes longer than the pool's acquire timeout plus the statement timeout,
/// the API serves again within 5 s of PostgreSQL's return, and no answer ever carries another
/// tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_api_load_is_503_then_served_again() {
    let _turn = TURN.lock().await;
    let stack = own_stack().await;
    let ns = own_ns().await;
    let _op = operator(stack, &ns, &[]).await;
    let names: Vec<String> = LOADED.iter().map(|s| s.to_string()).collect();
    for n in &names {
        ns.create(Tenant::test(n)).await;
    }
    wait_all_ready(&ns, &names, Duration::from_secs(60)).await;
    let acquire = ACQUIRE_MS.to_string();
    let statement = STATEMENT_MS.to_string();
    let (_api, port) = api_process(
        stack,
        &ns,
        &[
            "--pool-size",
            "4",
            "--pool-acquire-timeout-ms",
            &acquire,
            "--statement-timeout-ms",
            &statement,
        ],
    )
    .await;
    let mut tokens = BTreeMap::new();
    for n in &names {
        let tok = tenant_token(&ns, n).await;
        let r = eventually("tenant routable and seeded", Duration::from_secs(30), {
            let (n, tok) = (n.clone(), tok.clone());
            move || {
                let (n, tok) = (n.clone(), tok.clone());
                async move {
                    let body = format!(r#"{{"name":"{n}:seed"}}"#);
                    let r = call(
                        port,
                        "POST",
                        &n,
                        &tok,
                        "/v1/tables/projects",
                        Some(&body),
                        Duration::from_secs(10),
                    )
                    .await;
                    (r.status == 201).then_some(r)
                }
            }
        })
        .await;
        assert!(r.body.contains(&format!("\"{n}:seed\"")), "{}", r.body);
        tokens.insert(n.clone(), tok);
    }

    // One client per tenant: a GET of its rows, then a POST of a new one, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let client_limit = Duration::from_secs(30);
    let clients: Vec<_> = names
        .iter()
        .map(|n| {
            let (n, tok, stop) = (n.clone(), tokens[n].clone(), stop.clone());
            tokio::spawn(async move {
                let mut replies = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let r = if i.is_multiple_of(2) {
                        let body = format!(r#"{{"name":"{n}:{i}"}}"#);
                        call(
                            port,
                            "POST",
                            &n,
                            &tok,
                            "/v1/tables/projects",
                            Some(&body),
                            client_limit,
                        )
                        .await
                    } else {
                        call(
                            port,
                            "GET",
                            &n,
                            &tok,
                            "/v1/tables/projects?select=name&order=id.desc&limit=20",
                            None,
                            client_limit,
                        )
                        .await
                    };
                    let failed = !r.ok();
                    replies.push((n.clone(), r));
                    if failed {
                        // As a client honouring Retry-After would, but without waiting whole
                        // seconds: the test measures when service comes back.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                replies
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down = Instant::now();
    let outage = Outage::begin(Server::Postgres).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = outage.end().await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.store(true, Ordering::Relaxed);
    let mut replies = Vec::new();
    for c in clients {
        replies.extend(c.await.unwrap());
    }

    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut max_outage_latency = Duration::ZERO;
    let mut first_ok_after_back: Option<Duration> = None;
    let mut last_failure_after_back: Option<Duration> = None;
    let mut served = 0;
    for (tenant, r) in &replies {
        let end = r.started + r.took;
        assert!(
            r.status != 0,
            "{tenant}: no answer within {client_limit:?} (started {:?} after the crash)",
            r.started.saturating_duration_since(down)
        );
        if r.ok() {
            served += 1;
            // Only the tenant's own rows, never another's.
            for other in LOADED.iter().filter(|o| *o != tenant) {
                assert!(
                    !r.body.contains(&format!("\"{other}:")),
                    "{tenant} was answered with {other}'s rows: {}",
                    r.body
                );
            }
            assert!(
                r.body.contains(&format!("\"{tenant}:")),
                "{tenant}: {}",
                r.body
            );
            if end > back {
                let at = end - back;
                first_ok_after_back = Some(first_ok_after_back.map_or(at, |f| f.min(at)));
            }
            continue;
        }
        let kind = r.problem().unwrap_or_else(|| {
            panic!(
                "{tenant}: {} that is not problem+json: {:?} {}",
                r.status, r.headers, r.body
            )
        });
        if r.status == 502 {
            // A POST whose connection broke after it was sent: not to be retried blindly.
            assert_eq!(kind, "write-outcome-unknown", "{tenant}: {}", r.body);
            assert!(!r.headers.contains_key("retry-after"), "{:?}", r.headers);
        } else {
            assert!(
                r.status == 503
                    && matches!(kind.as_str(), "database-unavailable" | "pool-exhausted"),
                "{tenant}: {} {kind}: {}",
                r.status,
                r.body
            );
            assert!(
                r.headers
                    .get("retry-after")
                    .is_some_and(|v| v.parse::<u64>().is_ok()),
                "{tenant}: 503 without Retry-After: {:?}",
                r.headers
            );
        }
        assert!(
            end > down,
            "{tenant}: failed before PostgreSQL went down: {kind}"
        );
        max_outage_latency = max_outage_latency.max(r.took);
        if end > back {
            let at = end - back;
            last_failure_after_back = Some(last_failure_after_back.map_or(at, |l| l.max(at)));
        }
        *kinds.entry(kind).or_default() += 1;
    }
    let first_ok = first_ok_after_back.expect("nothing was served after PostgreSQL came back");
    eprintln!(
        "faults: API under load, PostgreSQL down 3 s: {} requests, {served} served, 503s {kinds:?}; \
         slowest failed answer {} ms (bound {} ms); first success {} ms after PostgreSQL was back, last failure {}",
        replies.len(),
        max_outage_latency.as_millis(),
        ACQUIRE_MS + STATEMENT_MS + 1000,
        first_ok.as_millis(),
        last_failure_after_back.map_or("before it was back".into(), |l| format!(
            "{} ms after",
            l.as_millis()
        )),
    );
    assert!(
        kinds.values().sum::<usize>() > 0,
        "no request met the outage: it proves nothing"
    );
    // A margin for the 2-core machine over what the settings bound.
    assert!(
        max_outage_latency < Duration::from_millis(ACQUIRE_MS + STATEMENT_MS + 1000),
        "a request took {max_outage_latency:?} while PostgreSQL was down"
    );
    assert!(
        first_ok < Duration::from_secs(5),
        "served again only {first_ok:?} after PostgreSQL came back"
    );
    assert!(
        last_failure_after_back.is_none_or(|l| l < Duration::from_secs(5)),
        "still failing {last_failure_after_back:?} after PostgreSQL came back"
    );
}

/// The kube-apiserver killed while 10 Tenants are provisioned (at the first one Ready) and
/// started again: the API keeps serving the tenants it knew from its registry meanwhile, the
/// operator converges (every Tenant Ready, nothing left over), and a Tenant created after the
/// restart becomes routable in the API (its watch re-synced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restarted_during_provisioning_converges_and_the_api_keeps_serving() {
    let _turn = TURN.lock().await;
    let stack = own_stack().await;
    let ns = own_ns().await;
    let _op = operator(stack, &ns, &["--concurrency", "4"]).await;
    let known: Vec<String> = vec!["known-a".into(), "known-b".into()];
    for n in &known {
        ns.create(Tenant::test(n)).await;
    }
    wait_all_ready(&ns, &known, Duration::from_secs(60)).await;
    let (_api, port) = api_process(stack, &ns, &["--pool-size", "4"]).await;
    let mut tokens = BTreeMap::new();
    for n in &known {
        let tok = tenant_token(&ns, n).await;
        eventually("known tenant routable", Duration::from_secs(30), {
            let (n, tok) = (n.clone(), tok.clone());
            move || {
                let (n, tok) = (n.clone(), tok.clone());
                async move {
                    let body = format!(r#"{{"name":"{n}:seed"}}"#);
                    let r = call(
                        port,
                        "POST",
                        &n,
                        &tok,
                        "/v1/tables/projects",
                        Some(&body),
                        Duration::from_secs(10),
                    )
                    .await;
                    (r.status == 201).then_some(())
                }
            }
        })
        .await;
        tokens.insert(n.clone(), tok);
    }

    let fresh: Vec<String> = (0..10).map(|i| format!("p{i:02}")).collect();
    for n in &fresh {
        ns.create(Tenant::test(n)).await;
    }
    let first = Instant::now();
    while count_ready(&ns, &fresh).await == 0 {
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "no Tenant became Ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_at_kill = count_ready(&ns, &fresh).await;
    let outage = Outage::begin(Server::Apiserver).await;
    let down = Instant::now();
    // The known tenants are served meanwhile (the restart itself takes seconds).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, tokens) = (stop.clone(), tokens.clone());
        tokio::spawn(async move {
            let mut replies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (n, tok) in &tokens {
                    let r = call(
                        port,
                        "GET",
                        n,
                        tok,
                        "/v1/tables/projects?select=name",
                        None,
                        Duration::from_secs(10),
                    )
                    .await;
                    replies.push((n.clone(), r));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            replies
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = outage.end().await;
    stop.store(true, Ordering::Relaxed);
    let replies = reader.await.unwrap();
    let down_for = back - down;
    for (n, r) in &replies {
        assert_eq!(
            r.status, 200,
            "{n} while the apiserver was down: {}",
            r.body
        );
        assert!(r.body.contains(&format!("\"{n}:seed\"")), "{n}: {}", r.body);
    }
    assert!(replies.len() >= 4, "{} requests", replies.len());

    let mut all = known.clone();
    all.extend(fresh.iter().cloned());
    let converged = wait_all_ready(&ns, &all, Duration::from_secs(120)).await;

    // A Tenant created after the restart is routed once the API's watch is back.
    let created = Instant::now();
    ns.create(Tenant::test("late")).await;
    wait_ready(&ns, "late").await;
    let ready = created.elapsed();
    let tok = tenant_token(&ns, "late").await;
    eventually(
        "the late Tenant routable",
        Duration::from_secs(60),
        move || {
            let tok = tok.clone();
            async move {
                let r = call(
                    port,
                    "GET",
                    "late",
                    &tok,
                    "/v1/tenant",
                    None,
                    Duration::from_secs(10),
                )
                .await;
                (r.status == 200).then_some(())
            }
        },
    )
    .await;
    let routable = created.elapsed();
    eprintln!(
        "faults: kube-apiserver killed with {ready_at_kill}/10 Tenants Ready, down {:.1} s (restart included): \
         {} API reads of known tenants meanwhile, all 200; all Ready {:.1} s after it was back; \
         a Tenant created after: Ready in {:.1} s, routable in {:.1} s",
        down_for.as_secs_f64(),
        replies.len(),
        converged.as_secs_f64(),
        ready.as_secs_f64(),
        routable.as_secs_f64(),
    );
    assert!(
        ready_at_kill < fresh.len(),
        "the kill came after provisioning: it proves nothing"
    );
    // The watches, and the operator's controller on top of them, retry at least every 5 s
    // (`watch::WatchBackoff`). With kube-runtime's default backoff (to 30 s, in both layers)
    // this took 25–28 s here, and over 60 s with only the watches' capped; now some 10–13 s,
    // most of it the restarted apiserver holding the first watches before `410 Expired`.
    assert!(
        routable < Duration::from_secs(45),
        "a Tenant created after the restart took {routable:?} to be routable"
    );
    all.push("late".into());
    assert_fleet(stack, &ns, &all, 2).await;
}

/// The API process's resident memory, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// The exhaustion test's API timeouts.
const EXHAUST_ACQUIRE_MS: u64 = 500;
const EXHAUST_STATEMENT_MS: u64 = 2500;

/// Pool exhaustion and slow queries, in waves against the API process (4 connections,
/// 500 ms acquire timeout, 2.5 s statement timeout; a tenant's share is one request in
/// flight): four tenants each fire 8 reads of a view that sleeps 10 s, then a fifth tenant
/// asks. Each slow tenant's one admitted read is cancelled by PostgreSQL at the statement
/// timeout (504 `statement-timeout`), its other 7 are refused at once (429), the fifth tenant
/// gets 503 `pool-exhausted` with Retry-After within the acquire timeout, PostgreSQL never
/// sees more than the pool's 4 gateway sessions, nothing waits longer than the statement
/// timeout, and the API's memory stays flat from the first wave to the last. Nothing is
/// restarted: it runs on the shared stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_queries_exhaust_the_pool_into_bounded_503s_and_504s() {
    const SLOW: [&str; 4] = ["slow-a", "slow-b", "slow-c", "slow-d"];
    const WAVES: usize = 5;
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let pg = pg().await;
    let mut names: Vec<String> = SLOW.iter().map(|s| s.to_string()).collect();
    names.push("patient".into());
    for n in &names {
        ns.create(Tenant::test(n)).await;
    }
    for n in &names {
        wait_ready(&ns, n).await;
    }
    for n in SLOW {
        crate::limits::as_owner(
            &pg,
            &ns.schema(n),
            "CREATE VIEW slow AS SELECT 1 AS id, pg_catalog.pg_sleep(10)::text AS slept",
        )
        .await;
    }
    let acquire = EXHAUST_ACQUIRE_MS.to_string();
    let statement = EXHAUST_STATEMENT_MS.to_string();
    let (api, port) = api_process(
        env(),
        &ns,
        &[
            "--pool-size",
            "4",
            "--pool-acquire-timeout-ms",
            &acquire,
            "--statement-timeout-ms",
            &statement,
        ],
    )
    .await;
    let pid = api.0.id();
    let mut tokens = BTreeMap::new();
    for n in &names {
        let tok = tenant_token(&ns, n).await;
        // Routable, and its catalog read, before the waves.
        eventually("tenant served", Duration::from_secs(30), {
            let (n, tok) = (n.clone(), tok.clone());
            move || {
                let (n, tok) = (n.clone(), tok.clone());
                async move {
                    let r = call(
                        port,
                        "GET",
                        &n,
                        &tok,
                        "/v1/tables/projects",
                        None,
                        Duration::from_secs(10),
                    )
                    .await;
                    (r.status == 200).then_some(())
                }
            }
        })
        .await;
        tokens.insert(n.clone(), tok);
    }
    let gateway = gateway_role(&ns);
    let limit = Duration::from_secs(30);

    // Unmeasured first waves until the pool has opened its 4 connections (SCRAM logins of
    // a debug build take seconds on a loaded machine, so a cold wave may never have all four
    // slow reads in PostgreSQL at once), and the API's allocations settle before RSS is read.
    let mut opened = 0;
    for _ in 0..10 {
        let warm = futures::future::join_all(SLOW.iter().map(|n| {
            let tok = tokens[*n].clone();
            async move { call(port, "GET", n, &tok, "/v1/tables/slow", None, limit).await }
        }))
        .await;
        for r in &warm {
            assert!(
                matches!(r.status, 504 | 503),
                "warm-up: {} {}",
                r.status,
                r.body
            );
        }
        opened = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE usename = $1",
        )
        .bind(&gateway)
        .fetch_one(&pg)
        .await
        .unwrap();
        if opened == 4 {
            break;
        }
    }
    assert_eq!(opened, 4, "the API's pool never opened its 4 connections");

    let mut rss = Vec::new();
    let mut worst: BTreeMap<&str, Duration> = BTreeMap::new();
    for wave in 0..WAVES {
        let started = Instant::now();
        let slow = futures::future::join_all(SLOW.iter().flat_map(|n| {
            let tok = tokens[*n].clone();
            (0..8).map(move |_| {
                let tok = tok.clone();
                async move { call(port, "GET", n, &tok, "/v1/tables/slow", None, limit).await }
            })
        }));
        let patient = async {
            // Once the slow reads hold every connection, sleeping in PostgreSQL.
            let mut sessions;
            let waiting = Instant::now();
            loop {
                let (all, sleeping): (i64, i64) = sqlx::query_as(
                    "SELECT count(*), count(*) FILTER (WHERE wait_event = 'PgSleep')
                       FROM pg_catalog.pg_stat_activity WHERE usename = $1",
                )
                .bind(&gateway)
                .fetch_one(&pg)
                .await
                .unwrap();
                sessions = all;
                if sleeping == 4 {
                    break;
                }
                assert!(
                    waiting.elapsed() < Duration::from_millis(EXHAUST_STATEMENT_MS - 1000),
                    "wave {wave}: the slow reads never held the 4 connections ({sleeping} sleeping)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let r = call(
                port,
                "GET",
                "patient",
                &tokens["patient"],
                "/v1/tables/projects",
                None,
                limit,
            )
            .await;
            (sessions, r)
        };
        let (slow, (sessions, patient)) = tokio::join!(slow, patient);
        let wave_took = started.elapsed();

        assert!(sessions <= 4, "wave {wave}: {sessions} gateway sessions");
        assert_eq!(
            (patient.status, patient.problem().as_deref()),
            (503, Some("pool-exhausted")),
            "wave {wave}: {}",
            patient.body
        );
        assert!(
            patient.headers.contains_key("retry-after"),
            "{:?}",
            patient.headers
        );
        let w = worst.entry("pool-exhausted").or_default();
        *w = (*w).max(patient.took);
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for r in &slow {
            let kind = r
                .problem()
                .unwrap_or_else(|| panic!("wave {wave}: {} {}", r.status, r.body));
            match (r.status, kind.as_str()) {
                (504, "statement-timeout") => {
                    let w = worst.entry("statement-timeout").or_default();
                    *w = (*w).max(r.took);
                }
                (429, "too-many-requests") => {
                    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
                    let w = worst.entry("too-many-requests").or_default();
                    *w = (*w).max(r.took);
                }
                _ => panic!("wave {wave}: {} {}", r.status, r.body),
            }
            *kinds.entry(kind).or_default() += 1;
        }
        assert_eq!(
            kinds.get("statement-timeout"),
            Some(&SLOW.len()),
            "wave {wave}: one admitted read per slow tenant: {kinds:?}"
        );
        assert!(
            wave_took < Duration::from_millis(EXHAUST_STATEMENT_MS + 1500),
            "wave {wave} took {wave_took:?}"
        );
        rss.push(rss_kb(pid));
    }
    // The connections the cancelled statements held serve again.
    let r = call(
        port,
        "GET",
        "patient",
        &tokens["patient"],
        "/v1/tables/projects",
        None,
        limit,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    eprintln!(
        "faults: pool exhaustion, {WAVES} waves of 32 slow reads + 1 other tenant's: slowest 504 {} ms (statement timeout {EXHAUST_STATEMENT_MS} ms), \
         slowest 503 pool-exhausted {} ms (acquire timeout {EXHAUST_ACQUIRE_MS} ms), slowest 429 {} ms; API RSS per wave {rss:?} kB",
        worst["statement-timeout"].as_millis(),
        worst["pool-exhausted"].as_millis(),
        worst["too-many-requests"].as_millis(),
    );
    assert!(
        worst["statement-timeout"] < Duration::from_millis(EXHAUST_STATEMENT_MS + 1000),
        "{worst:?}"
    );
    assert!(
        worst["pool-exhausted"] < Duration::from_millis(EXHAUST_ACQUIRE_MS + 1000),
        "{worst:?}"
    );
    assert!(
        worst["too-many-requests"] < Duration::from_secs(1),
        "{worst:?}"
    );
    let (first, last) = (rss[0], rss[WAVES - 1]);
    assert!(
        last < first * 3 / 2 + 20 * 1024,
        "API memory grew from {first} kB to {last} kB over {WAVES} waves"
    );
}
