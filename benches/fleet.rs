//! Fleet benchmarks against a real kube-apiserver and PostgreSQL, each beside its baseline in
//! the same run (see BENCHMARKS.md):
//!
//!   cargo bench --bench fleet -- provision N      N Tenants → all Ready (operator as a process: rate at
//!                                                 checkpoints, RSS, CPU, no-op resync), vs the apiserver
//!                                                 accepting the creates + the same DDL without Kubernetes
//!   cargo bench --bench fleet -- migrate N        one additive migration over N tenants, vs the same SQL; no-op resync
//!   cargo bench --bench fleet -- api N            GET by primary key with JWT over N tenants, uniform and Zipf,
//!                                                 list-with-filter and POST (wrk), vs plain axum + sqlx with and
//!                                                 without its per-acquire ping; --get-only skips list and POST,
//!                                                 --list-and-post runs only those,
//!                                                 --cold adds the first 15 s after a start and recycling,
//!                                                 --noisy (N > 50) the noisy-neighbour p99
//!   cargo bench --bench fleet -- registry N       API registry: sync of N Tenants, RSS, Ready → routable
//!   cargo bench --bench fleet -- placement N      N Tenants over three servers (the default and two
//!                                                 PostgresServers): time to all Ready, tenants per server,
//!                                                 vs N more all placed on the default server
//!   cargo bench --bench fleet -- drift N          schema drift scan of N tenant schemas (raw provisioning, 1 %
//!                                                 changed by hand): the one fingerprint query, the descriptors of
//!                                                 the drifted ones, vs one query per schema; the references' build
//!
//! Options: --concurrency C (reconciles in flight, default 16), --connections K (database
//! connections of the operator and of the raw-SQL baseline, default 8), --pool P (API pool,
//! default 16), --seconds S (wrk duration, default 10), --tenant-max-concurrency T (the API's
//! per-tenant share; default 0 = a quarter of the pool, which `api 1` needs raised to the pool
//! size to measure throughput rather than 429s).

use std::{
    collections::HashSet,
    process::Command,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    api::{ObjectMeta, PostParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use sqlx::postgres::PgPoolOptions;
use tenantry::{
    controller::{self, Settings},
    domain::crd::Tenant,
    domain::naming::Ident,
    domain::state::{Observed, Owner},
    postgres::{migrations::MigrationSet, tenant::Names, Admin},
    telemetry::Metrics,
};
use tokio::sync::oneshot;

#[path = "../tests/support/stack.rs"]
mod stack;

mod api_bench;
mod provision_bench;

use stack::Stack;

fn start_stack() -> Stack {
    let stack = stack::start("tenantry-bench-");
    stack::install_crd(&stack.kubeconfig);
    stack
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn client(stack: &Stack) -> Client {
    tenantry::cli::kube_client(Some(&stack.kubeconfig), None)
        .await
        .unwrap()
}

async fn namespace(client: &Client, name: &str) {
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let _ = Api::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
}

struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
}

impl Operator {
    async fn start(
        stack: &Stack,
        client: &Client,
        ns: &str,
        concurrency: u16,
        migrations: MigrationSet,
    ) -> Self {
        Self::start_live(
            stack,
            client,
            &[ns],
            concurrency,
            concurrency as u32,
            migrations,
            None,
        )
        .await
    }

    /// An operator with `connections` admin connections watching the Tenants of `namespaces`
    /// (its own is the first), watching `source` when given and reporting on the
    /// TenantRollout `tenantry` of its namespace.
    async fn start_live(
        stack: &Stack,
        client: &Client,
        namespaces: &[&str],
        concurrency: u16,
        connections: u32,
        migrations: MigrationSet,
        source: Option<controller::MigrationSource>,
    ) -> Self {
        let gw = Ident::parse_role("bench_gateway").unwrap();
        let admin = Admin::new(&stack.database_url, connections, None, None)
            .unwrap()
            .with_gateway(Some(gw));
        let ns = namespaces[0];
        let settings = Settings {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            concurrency,
            health_addr: "127.0.0.1:0".parse().unwrap(),
            gateway_secret: Some((ns.into(), "tenantry-gateway".into())),
            signing_key: (ns.into(), "tenantry-signing-key".into()),
            base_domain: None,
            leader: None,
            rollout: Default::default(),
            usage_interval: std::time::Duration::from_secs(60),
            drift_interval: Duration::ZERO,
            resync: tenantry::controller::RESYNC,
            rollout_object: source
                .as_ref()
                .map(|_| (ns.to_string(), "tenantry".to_string())),
            migration_source: source,
            default_server: "default".into(),
            server_selector: String::new(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let metrics = Metrics::default();
        let (c, m) = (client.clone(), metrics.clone());
        let task = tokio::spawn(async move {
            controller::run(c, admin, migrations, settings, m, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            stop: Some(tx),
            task,
            metrics,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
    }
}

/// Waits until `pred` holds for `n` Tenants of `ns`, following a watch (no polling lists).
async fn wait_for(client: &Client, ns: &str, n: usize, pred: impl Fn(&Tenant) -> bool) {
    let api: Api<Tenant> = Api::namespaced(client.clone(), ns);
    let mut done: HashSet<String> = HashSet::new();
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects());
    while let Some(t) = stream.try_next().await.unwrap() {
        let name = t.metadata.name.clone().unwrap();
        if pred(&t) {
            done.insert(name);
        } else {
            done.remove(&name);
        }
        if done.len() >= n {
            return;
        }
    }
}

async fn create_tenants(client: &Client, ns: &str, n: usize) {
    let api: Api<Tenant> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &Tenant::test(&format!("t{i:05}")))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// The operator's DDL for `n` tenants, without Kubernetes: role, schema, migrations, over
/// `conc` connections (the baseline).
async fn raw_provision(
    stack: &Stack,
    prefix: &str,
    n: usize,
    conc: usize,
    set: &MigrationSet,
) -> Duration {
    let mut admin = Admin::new(&stack.database_url, conc as u32, None, None)
        .unwrap()
        .with_gateway(Some(Ident::parse_role("bench_gateway").unwrap()));
    admin.bootstrap().await.unwrap();
    admin
        .ensure_gateway("bench-gateway-password-0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let names =
                    Names::new(Ident::parse("schema", &format!("{prefix}_{i:05}")).unwrap());
                let owner = Owner::new("raw", &format!("{prefix}{i}"), "uid");
                let nothing = Observed::default();
                let password = tenantry::domain::scram::generate_password();
                admin
                    .ensure_roles(
                        &names,
                        &owner,
                        &nothing,
                        Some(&password),
                        &tenantry::postgres::tenant::Logins {
                            app: true,
                            b: false,
                            retire: None,
                        },
                        &admin.login_settings(None, None),
                    )
                    .await
                    .unwrap();
                admin
                    .ensure_schema(&names, &owner, &nothing, set, false, false)
                    .await
                    .unwrap();
                admin.migrate(&names, set).await.unwrap();
            }
        })
        .buffer_unordered(conc)
        .collect::<Vec<_>>()
        .await;
    started.elapsed()
}

async fn raw_migrate(
    stack: &Stack,
    prefix: &str,
    n: usize,
    conc: usize,
    set: &MigrationSet,
) -> Duration {
    let admin = Admin::new(&stack.database_url, conc as u32, None, None).unwrap();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let names =
                    Names::new(Ident::parse("schema", &format!("{prefix}_{i:05}")).unwrap());
                admin.migrate(&names, set).await.unwrap();
            }
        })
        .buffer_unordered(conc)
        .collect::<Vec<_>>()
        .await;
    started.elapsed()
}

fn with_extra_migration() -> MigrationSet {
    let mut files = MigrationSet::embedded().to_files();
    files.push((
        "3_task_priority.sql".into(),
        "ALTER TABLE tasks ADD COLUMN priority integer NOT NULL DEFAULT 0;".into(),
    ));
    MigrationSet::from_files(files).unwrap()
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn op_reconciles(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("tenantry_reconcile_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Replaces the data of the ConfigMap `name` in `ns` with `files`.
async fn put_config_map(client: &Client, ns: &str, name: &str, files: &[(String, String)]) {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    let data: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    api.patch(
        name,
        &kube::api::PatchParams::apply("bench").force(),
        &kube::api::Patch::Apply(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name}, "data": data,
        })),
    )
    .await
    .unwrap();
}

/// Polls the TenantRollout `tenantry` of `ns` every 10 ms until its completedVersion is `v`.
async fn wait_completed(client: &Client, ns: &str, v: i64) {
    let api: Api<tenantry::domain::rollout::TenantRollout> = Api::namespaced(client.clone(), ns);
    loop {
        if let Ok(Some(r)) = api.get_opt("tenantry").await {
            if r.status.and_then(|s| s.completed_version) == Some(v) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sequential GETs of one tenant's task through the API until `stop`: latencies in ms.
async fn probe(port: u16, token: String, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<f64> {
    let mut http = api_bench::Http::connect(port).await;
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let status = http.get("/v1/tables/tasks/1", &token).await;
        assert_eq!(status, 200, "probe GET");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    out
}

fn p99(mut v: Vec<f64>) -> (f64, usize) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (api_bench::pct(&v, 99.0), v.len())
}

async fn migrate(stack: &Stack, n: usize, conc: u16) -> Vec<String> {
    let client = client(stack).await;
    let ns = format!("bench-migrate-{n}");
    namespace(&client, &ns).await;
    let prefix = format!("rawm{n}");
    let connections = arg("--connections", 8) as usize;
    raw_provision(stack, &prefix, n, connections, &MigrationSet::embedded()).await;
    put_config_map(&client, &ns, "bench-migrations", &[]).await;
    let source = controller::MigrationSource {
        kind: controller::SourceKind::ConfigMap {
            namespace: ns.clone(),
            name: "bench-migrations".into(),
        },
        demo: true,
        poll: Duration::from_secs(10),
    };
    let op = Operator::start_live(
        stack,
        &client,
        &[&ns],
        conc,
        connections as u32,
        MigrationSet::embedded(),
        Some(source.clone()),
    )
    .await;
    create_tenants(&client, &ns, n).await;
    wait_for(&client, &ns, n, |t| t.is_ready()).await;
    wait_completed(&client, &ns, 2).await;

    // One tenant read through the API while its table is migrated.
    let probe_schema = format!("{}_t00000", ns.replace('-', "_"));
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&stack.database_url)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO \"{probe_schema}\".projects (name) VALUES ('p');
         INSERT INTO \"{probe_schema}\".tasks (project_id, title) VALUES (1, 't')"
    ))
    .execute(&admin)
    .await
    .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let key = secrets.get("t00000-db").await.unwrap().data.unwrap()["jwt-key"]
        .0
        .clone();
    let token = tenantry::cli::mint_token("t00000", &key, "bench", 3600).unwrap();
    let gateway = secrets.get("tenantry-gateway").await.unwrap().data.unwrap()["uri"]
        .0
        .clone();
    let ours = api_bench::start_ours(
        &client,
        &ns,
        &String::from_utf8(gateway).unwrap(),
        4,
        Duration::from_secs(1800),
        4,
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle = tokio::spawn(probe(ours.port, token.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (idle_p99, idle_n) = p99(idle.await.unwrap());

    let set = with_extra_migration();
    let baseline = raw_migrate(stack, &prefix, n, connections, &set).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let during = tokio::spawn(probe(ours.port, token, stop.clone()));
    let extra: Vec<(String, String)> = set.to_files().into_iter().skip(2).collect();
    let started = Instant::now();
    put_config_map(&client, &ns, "bench-migrations", &extra).await;
    wait_completed(&client, &ns, 3).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (during_p99, during_n) = p99(during.await.unwrap());
    wait_for(&client, &ns, n, |t| {
        t.status.as_ref().and_then(|s| s.migration_version) == Some(3)
    })
    .await;
    let statuses = started.elapsed();
    op.stop().await;

    // No-op resync: a restart with nothing to apply.
    let started = Instant::now();
    let op = Operator::start(stack, &client, &ns, conc, set).await;
    while op_reconciles(&op.metrics.encode()) < n as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noop = started.elapsed();
    op.stop().await;
    vec![
        format!(
            "| one additive migration over {n} tenants: ConfigMap change → TenantRollout `completedVersion: 3` (live, no restart; {connections} admin connections) | {:.2} s | raw SQL, {connections} connections: {:.2} s | {:.2}× | goal ≤ 2× |",
            took.as_secs_f64(),
            baseline.as_secs_f64(),
            ratio(took, baseline)
        ),
        format!(
            "| … until every Tenant's `status.migrationVersion` says 3 (off the critical path) | {:.2} s | raw SQL: {:.2} s | {:.2}× | one status write per tenant, after the rollout |",
            statuses.as_secs_f64(),
            baseline.as_secs_f64(),
            ratio(statuses, baseline)
        ),
        format!(
            "| one tenant's API GET of a row of the migrated table, p99 during the rollout ({during_n} requests) | {during_p99:.2} ms | the same GETs before it ({idle_n} requests): {idle_p99:.2} ms | {:.2}× | sequential GETs through `tenantry api` |",
            during_p99 / idle_p99
        ),
        format!(
            "| no-op resync of {n} tenants (operator restart) | {:.2} s | goal ≤ 5 s | {:.2}× of goal | every tenant reconciled once: no DDL, no Secret or status writes |",
            noop.as_secs_f64(),
            noop.as_secs_f64() / 5.0
        ),
    ]
}

/// The schema drift scan over `n` tenant schemas provisioned without Kubernetes, 1 % of them
/// changed by hand: the one fleet query (median of 3), the descriptors of the drifted ones and
/// their naming, beside the same query run once per schema; and the reference build.
async fn drift(stack: &Stack, n: usize) -> Vec<String> {
    let connections = arg("--connections", 8) as usize;
    let prefix = format!("drift{n}");
    let set = MigrationSet::embedded();
    raw_provision(stack, &prefix, n, connections, &set).await;
    let pg = PgPoolOptions::new()
        .max_connections(1)
        .connect(&stack.database_url)
        .await
        .unwrap();
    let schemas: Vec<String> = (0..n).map(|i| format!("{prefix}_{i:05}")).collect();
    let drifted = (n / 100).max(1);
    for s in &schemas[..drifted] {
        sqlx::Executor::execute(
            &pg,
            format!("ALTER TABLE \"{s}\".tasks ADD COLUMN priority integer").as_str(),
        )
        .await
        .unwrap();
    }
    let admin = Admin::new(&stack.database_url, connections as u32, None, None).unwrap();
    let started = Instant::now();
    let refs = admin.build_references(&set).await.unwrap();
    let reference = started.elapsed();
    let latest = refs.get(&set.latest()).unwrap().clone();
    let mut scans = Vec::new();
    let mut suspects = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let scan = admin.fingerprint_hashes(&schemas).await.unwrap();
        scans.push(started.elapsed());
        assert_eq!(scan.of.len(), n, "every schema scanned");
        suspects = scan
            .of
            .into_iter()
            .filter(|(_, h)| *h != latest.hash)
            .map(|(s, _)| s)
            .collect();
    }
    scans.sort();
    let scan = scans[1];
    assert_eq!(
        suspects.len(),
        drifted,
        "exactly the schemas changed by hand"
    );
    let started = Instant::now();
    let read = admin.fingerprint_descriptors(&suspects).await.unwrap();
    let named: usize = read
        .of
        .values()
        .map(|d| {
            tenantry::domain::drift::differences(d, &latest.descriptors, "migration version 2")
                .len()
        })
        .sum();
    let read_took = started.elapsed();
    assert_eq!(named, drifted, "one named difference each");
    let started = Instant::now();
    futures::stream::iter(schemas.iter())
        .map(|s| {
            let admin = admin.clone();
            async move {
                admin
                    .fingerprint_hashes(std::slice::from_ref(s))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(connections)
        .collect::<Vec<_>>()
        .await;
    let per_schema = started.elapsed();
    vec![
        format!(
            "| schema drift scan of {n} tenant schemas (one catalog query: a fingerprint hash per schema; median of 3) | {:.2} s | the same query once per schema, {connections} connections: {:.2} s | {:.2}× | then the descriptors of the {drifted} drifted schemas read and named in {:.3} s (one query) |",
            scan.as_secs_f64(),
            per_schema.as_secs_f64(),
            ratio(scan, per_schema),
            read_took.as_secs_f64(),
        ),
        format!(
            "| schema drift references of the migration set ({} versions and the empty schema; scratch tenant provisioned, migrated version by version, fingerprinted, dropped) | {:.2} s | | | once per migration set |",
            set.migrations().len(),
            reference.as_secs_f64(),
        ),
    ]
}

/// `n` Tenants created at once over the default server and two PostgresServers, then `n` more
/// all placed on the default server (the baseline: one server, same operator, same run).
async fn placement(stack: &Stack, n: usize, conc: u16) -> Vec<String> {
    use k8s_openapi::{api::core::v1::Secret, ByteString};
    use tenantry::domain::server::{
        PlacementSpec, PostgresServer, PostgresServerSpec, SecretKeyRef,
    };
    let client = client(stack).await;
    let (spread, single) = ("bench-spread", "bench-single");
    namespace(&client, spread).await;
    namespace(&client, single).await;
    let servers: Vec<stack::Server> = ["p2", "p3"].into_iter().map(stack::Server::start).collect();
    let ps_api: Api<PostgresServer> = Api::all(client.clone());
    for (name, s) in ["p2", "p3"].iter().zip(&servers) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), spread);
        let mut secret = Secret::default();
        secret.metadata.name = Some(format!("{name}-admin"));
        secret.data = Some([("uri".to_string(), ByteString(s.url.clone().into_bytes()))].into());
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let mut ps = PostgresServer::new(
            name,
            PostgresServerSpec {
                admin_secret_ref: SecretKeyRef {
                    name: format!("{name}-admin"),
                    key: None,
                },
                ..PostgresServerSpec::default()
            },
        );
        ps.metadata.labels = None;
        ps_api.create(&PostParams::default(), &ps).await.unwrap();
    }
    let op = Operator::start_live(
        stack,
        &client,
        &[spread, single],
        conc,
        conc as u32,
        MigrationSet::embedded(),
        None,
    )
    .await;
    // Both servers registered (Ready) before the first Tenant.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = ps_api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the PostgresServers did not become Ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = |t: &Tenant| t.condition("Ready").is_some_and(|c| c.status == "True");
    let started = Instant::now();
    create_tenants(&client, spread, n).await;
    wait_for(&client, spread, n, ready).await;
    let spread_took = started.elapsed();
    let tenants: Api<Tenant> = Api::namespaced(client.clone(), spread);
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tenants.list(&Default::default()).await.unwrap() {
        let s = t.status.and_then(|s| s.server).unwrap_or_default();
        *per.entry(s).or_default() += 1;
    }
    let even = n as f64 / 3.0;
    let worst = per
        .values()
        .map(|c| (*c as f64 - even).abs() / even * 100.0)
        .fold(0.0, f64::max);
    // The baseline: as many again, all on the default server.
    let api: Api<Tenant> = Api::namespaced(client.clone(), single);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut t = Tenant::test(&format!("t{i:05}"));
                t.spec.placement = Some(PlacementSpec {
                    server: Some("default".into()),
                    selector: None,
                });
                api.create(&PostParams::default(), &t).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    wait_for(&client, single, n, ready).await;
    let single_took = started.elapsed();
    op.stop().await;
    vec![
        format!(
            "| {n} Tenants over 3 servers → all Ready | {:.2} s | {n} on the default server alone: {:.2} s | {:.2}× | per server {per:?}; farthest from even: {worst:.1} % |",
            spread_took.as_secs_f64(),
            single_took.as_secs_f64(),
            ratio(spread_took, single_took)
        ),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let what = args.first().cloned().unwrap_or_else(|| "provision".into());
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(100);
    let conc = arg("--concurrency", 16) as u16;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stack = start_stack();
        println!(
            "| benchmark | tenantry | baseline (same run) | ratio | notes |\n|---|---|---|---|---|"
        );
        match what.as_str() {
            "provision" => {
                for l in provision_bench::provision(&stack, n, conc).await {
                    println!("{l}");
                }
            }
            "migrate" => {
                for l in migrate(&stack, n, conc).await {
                    println!("{l}");
                }
            }
            "api" => println!("{}", api_bench::api_bench(&stack, n, conc).await),
            "registry" => println!("{}", api_bench::registry_bench(&stack, n).await),
            "placement" => {
                for l in placement(&stack, n, conc).await {
                    println!("{l}");
                }
            }
            "drift" => {
                for l in drift(&stack, n).await {
                    println!("{l}");
                }
            }
            other => panic!("unknown benchmark {other}"),
        }
    });
}
