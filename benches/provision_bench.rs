//! `provision N`: N Tenants → all Ready with the operator as its own process (the `tenantry
//! controller` binary), so that its RSS and CPU time are its own. Beside it, in the same run:
//! the raw-SQL baseline for the same DDL and the time the apiserver takes to accept the N
//! creates with no operator running. Reports the Ready rate at checkpoints (1k, 5k, 10k and
//! quarters of N), the operator's RSS and CPU time at each, and a no-op resync (restart).
//! `TENANTRY_BENCH_OPERATOR=<path>` runs another build of the operator under the same harness.

use std::{
    collections::HashSet,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::TryStreamExt;
use kube::{
    api::{DeleteParams, ListParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use tenantry::{domain::crd::Tenant, postgres::migrations::MigrationSet};

use super::{arg, client, create_tenants, namespace, ratio, raw_provision, Stack};

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// User + system CPU seconds since the process started.
    cpu: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
}

impl Usage {
    fn of(pid: u32, ticks_per_second: f64) -> Self {
        // Fields after the command name (which may hold spaces, inside parentheses): state is
        // field 3, utime 14, stime 15.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |field: usize| -> f64 {
            fields
                .get(field - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0.0)
        };
        Self {
            cpu: (ticks(14) + ticks(15)) / ticks_per_second,
            rss_mb: kb("VmRSS:") / 1024.0,
            peak_rss_mb: kb("VmHWM:") / 1024.0,
        }
    }
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The operator binary: this build's, or another build's named by `TENANTRY_BENCH_OPERATOR`
/// (to measure an older revision with the same harness, in the same session).
fn operator_binary() -> String {
    std::env::var("TENANTRY_BENCH_OPERATOR")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tenantry").to_string())
}

/// `tenantry controller` watching one namespace, its health server on a free port.
struct OperatorProcess {
    child: Child,
    port: u16,
    ticks: f64,
}

impl OperatorProcess {
    fn start(stack: &Stack, ns: &str, conc: u16, connections: usize) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(operator_binary())
            .args([
                "controller",
                "--namespace",
                ns,
                "--health-addr",
                &format!("127.0.0.1:{port}"),
                "--concurrency",
                &conc.to_string(),
                "--db-max-connections",
                &connections.to_string(),
                "--gateway-role",
                "bench_gateway",
                "--gateway-secret-namespace",
                ns,
                "--signing-key-secret-namespace",
                ns,
                "--log-level",
                "warn",
            ])
            .env("DATABASE_URL", &stack.database_url)
            .env("KUBECONFIG", &stack.kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .expect("start tenantry controller");
        Self {
            child,
            port,
            ticks: ticks_per_second(),
        }
    }

    fn usage(&self) -> Usage {
        Usage::of(self.child.id(), self.ticks)
    }

    /// The Prometheus text from /metrics (empty until the health server listens).
    async fn metrics(&self) -> String {
        self.get("/metrics").await
    }

    /// Whether `/readyz` answers 200: the first full list of Tenants is in the store.
    async fn ready(&self) -> bool {
        self.get("/readyz").await.starts_with("HTTP/1.1 200")
    }

    async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return String::new();
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf).await;
        buf
    }

    /// Stops the process with SIGTERM (graceful shutdown), SIGKILL after 30 s.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reconciles(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tenantry_reconcile_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn reconcile_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tenantry_reconcile_duration_seconds_sum "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// When the count of Ready Tenants reached a checkpoint, and the operator's usage then.
struct Checkpoint {
    ready: usize,
    at: Duration,
    usage: Usage,
}

/// Follows a watch of `ns` until `n` Tenants are Ready, noting each checkpoint (since
/// `started`).
async fn watch_ready(
    client: &Client,
    ns: &str,
    n: usize,
    checkpoints: &[usize],
    started: Instant,
    op: &OperatorProcess,
) -> Vec<Checkpoint> {
    let api: Api<Tenant> = Api::namespaced(client.clone(), ns);
    let mut ready: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let mut next = checkpoints.iter().copied().peekable();
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects());
    while let Some(t) = stream.try_next().await.unwrap() {
        let name = t.metadata.name.clone().unwrap();
        if t.is_ready() {
            ready.insert(name);
        } else {
            ready.remove(&name);
        }
        while next.peek().is_some_and(|c| ready.len() >= *c) {
            out.push(Checkpoint {
                ready: next.next().unwrap(),
                at: started.elapsed(),
                usage: op.usage(),
            });
        }
        if ready.len() >= n {
            break;
        }
    }
    out
}

/// 1k, 5k and 10k where N reaches them, and the quarters of N.
fn checkpoints(n: usize) -> Vec<usize> {
    let mut c: Vec<usize> = [1_000, 5_000, 10_000]
        .into_iter()
        .chain([n / 4, n / 2, 3 * n / 4, n])
        .filter(|c| *c > 0 && *c <= n)
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

pub(super) async fn provision(stack: &Stack, n: usize, conc: u16) -> Vec<String> {
    let client = client(stack).await;
    let connections = arg("--connections", 8) as usize;

    // Baseline 1: the operator's DDL for n other tenants, without Kubernetes.
    let raw = raw_provision(
        stack,
        &format!("rawp{n}"),
        n,
        connections,
        &MigrationSet::embedded(),
    )
    .await;

    // Baseline 2: the apiserver accepting the same creates with no operator running. They
    // carry no finalizer, so they are deleted again at once.
    let accept_ns = format!("bench-accept-{n}");
    namespace(&client, &accept_ns).await;
    let t0 = Instant::now();
    create_tenants(&client, &accept_ns, n).await;
    let accept = t0.elapsed();
    Api::<Tenant>::namespaced(client.clone(), &accept_ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();

    let ns = format!("bench-provision-{n}");
    namespace(&client, &ns).await;
    let op = OperatorProcess::start(stack, &ns, conc, connections);
    while op.metrics().await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = op.usage();
    let started = Instant::now();
    let marks = checkpoints(n);
    let (points, created) =
        futures::join!(watch_ready(&client, &ns, n, &marks, started, &op), async {
            create_tenants(&client, &ns, n).await;
            started.elapsed()
        });
    let took = started.elapsed();
    let end = op.usage();
    let text = op.metrics().await;
    let (runs, summed) = (reconciles(&text), reconcile_seconds(&text));
    op.stop().await;

    // No-op resync: a restart with every Tenant Ready and nothing to apply; the clock runs
    // from process start until every Tenant was reconciled once.
    // Beside the total: when the first full list landed (/readyz), and reconciles done per
    // 5 s, which say whether the time goes to listing or to reconciling.
    let t0 = Instant::now();
    let op = OperatorProcess::start(stack, &ns, conc, connections);
    let (mut listed, mut trace, mut next) = (None, Vec::new(), 5.0);
    loop {
        let done = reconciles(&op.metrics().await);
        if listed.is_none() && op.ready().await {
            listed = Some(t0.elapsed());
        }
        if t0.elapsed().as_secs_f64() >= next {
            trace.push(format!("{next:.0} s: {done}"));
            next += 5.0;
        }
        if done >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noop = t0.elapsed();
    let resync = op.usage();
    op.stop().await;

    // The fleet's storage measurement (status.usage, quotas, the storage metric), as the
    // operator runs it every --usage-interval-secs: its cost over the n schemas just made.
    let schemas: Vec<String> = Api::<Tenant>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|t| t.status.and_then(|s| s.schema))
        .collect();
    let admin = tenantry::postgres::Admin::new(&stack.database_url, 1, None, None).unwrap();
    let mut usage_runs = Vec::new();
    let mut total_bytes = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        let measured = admin.measure_usage(&schemas).await.unwrap();
        usage_runs.push(t0.elapsed());
        total_bytes = measured.values().sum::<u64>();
    }
    usage_runs.sort();

    let goal = accept + raw;
    let secs = |d: Duration| d.as_secs_f64();
    let mut rates = Vec::new();
    let (mut prev_n, mut prev_t) = (0usize, 0.0f64);
    for p in &points {
        let t = secs(p.at);
        rates.push(format!(
            "{}: {:.1}/s ({:.1}/s since {prev_n}) at {t:.1} s, RSS {:.0} MB, CPU {:.1} s",
            p.ready,
            p.ready as f64 / t,
            (p.ready - prev_n) as f64 / (t - prev_t),
            p.usage.rss_mb,
            p.usage.cpu - idle.cpu,
        ));
        (prev_n, prev_t) = (p.ready, t);
    }
    vec![
        format!(
            "| provision {n} Tenants → all Ready (operator process, concurrency {conc}, {connections} connections) | {:.2} s ({:.1} tenants/s) | apiserver accepting the {n} creates alone {:.2} s + raw SQL ({connections} connections) {:.2} s = {:.2} s | {:.2}× | operator {}; {:.2}× raw SQL alone; creates done after {:.2} s; {runs} reconciles, {summed:.1} s reconcile time summed |",
            secs(took),
            n as f64 / secs(took),
            secs(accept),
            secs(raw),
            secs(goal),
            ratio(took, goal),
            operator_binary(),
            ratio(took, raw),
            secs(created),
        ),
        format!(
            "| provision {n}: Ready rate at checkpoints (cumulative, and since the previous checkpoint) | {} | — | — | rate flat = per-reconcile cost independent of the fleet |",
            rates.join("; ")
        ),
        format!(
            "| operator process, provision {n} | RSS {:.0} MB (peak {:.0} MB) at the end | — | — | CPU {:.1} s user+sys during the {:.1} s run ({:.0} % of one core); {:.1} s before the first create |",
            end.rss_mb,
            end.peak_rss_mb,
            end.cpu - idle.cpu,
            secs(took),
            100.0 * (end.cpu - idle.cpu) / secs(took),
            idle.cpu,
        ),
        format!(
            "| storage usage of {n} tenants, measured once (what the operator does every --usage-interval-secs) | {:.1} ms (median of 5; min {:.1}, max {:.1}) | — | — | {} schemas in {} statements of at most {} schemas, catalog functions only; {} in all |",
            usage_runs[2].as_secs_f64() * 1000.0,
            usage_runs[0].as_secs_f64() * 1000.0,
            usage_runs[4].as_secs_f64() * 1000.0,
            schemas.len(),
            schemas.len().div_ceil(tenantry::postgres::tenant::USAGE_CHUNK),
            tenantry::postgres::tenant::USAGE_CHUNK,
            tenantry::domain::limits::format_bytes(total_bytes),
        ),
        format!(
            "| no-op resync of {n} Ready tenants (operator restart, nothing to apply) | {:.2} s | — | — | process start → every Tenant reconciled once; first full Tenant list in the store (/readyz) at {}; reconciles done by {}; CPU {:.1} s, RSS {:.0} MB (peak {:.0} MB) |",
            secs(noop),
            listed.map_or("—".into(), |d| format!("{:.2} s", secs(d))),
            trace.join(", "),
            resync.cpu,
            resync.rss_mb,
            resync.peak_rss_mb,
        ),
    ]
}
