//! API and registry benchmarks: a module of the `fleet` bench, sharing its helpers.

use super::*;

async fn http_status(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

fn parse_ms(v: &str) -> f64 {
    if let Some(x) = v.strip_suffix("ms") {
        x.parse().unwrap_or(f64::NAN)
    } else if let Some(x) = v.strip_suffix("us") {
        x.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
    } else if let Some(x) = v.strip_suffix('s') {
        x.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
    } else {
        f64::NAN
    }
}

fn wrk(port: u16, script: &std::path::Path, seconds: u64, connections: u64) -> WrkResult {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(prefix)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_default()
    };
    WrkResult {
        rps: find("Requests/sec:").parse().unwrap_or(0.0),
        p50_ms: parse_ms(&find("50%")),
        p99_ms: parse_ms(&find("99%")),
        non_2xx: find("Non-2xx or 3xx responses:").parse().unwrap_or(0),
    }
}

/// What a benchmark request does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// GET one row by primary key.
    Get,
    /// GET a filtered, limited list.
    List,
    /// POST one new row, answered with it.
    Post,
}

/// How each request picks its tenant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pick {
    Uniform,
    /// Zipf with s = 1.1 over the tenants, in their creation order.
    Zipf,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Get => "GET by primary key",
            Shape::List => "GET list with filter (`id=gte.1&limit=10`)",
            Shape::Post => "POST one row",
        }
    }

    /// wrk's request for this shape: path, method and body (Lua expressions).
    fn lua(self, prefix: &str) -> (String, &'static str, &'static str) {
        match self {
            Shape::Get => (format!("\"{prefix}/1\""), "GET", "nil"),
            Shape::List => (
                format!("\"{prefix}?id=gte.1&limit=10\""),
                "GET",
                "nil",
            ),
            Shape::Post => (
                format!("\"{prefix}\""),
                "POST",
                "string.format('{\"name\":\"n%d-%d-%d\",\"description\":\"benchmark row\"}', thread_id, counter, math.random(1, 1000000000))",
            ),
        }
    }
}

/// A wrk script for `shape`: for tenantry (`tokens`, one per tenant, picked by `pick`) or,
/// with no tokens, for the plain server.
fn script(
    dir: &std::path::Path,
    shape: Shape,
    pick: Pick,
    tokens: &[String],
) -> std::path::PathBuf {
    let plain = tokens.is_empty();
    let prefix = if plain {
        "/projects"
    } else {
        "/v1/tables/projects"
    };
    let (path, method, body) = shape.lua(prefix);
    let mut lua = String::from("counter = 0\n");
    if plain {
        lua.push_str("function pick() return nil end\n");
    } else {
        let quoted: Vec<String> = tokens.iter().map(|t| format!("\"Bearer {t}\"")).collect();
        lua.push_str(&format!("tokens = {{ {} }}\n", quoted.join(", ")));
        match pick {
            Pick::Uniform => lua.push_str("function pick() return tokens[math.random(#tokens)] end\n"),
            Pick::Zipf => lua.push_str(
                "cdf = {}\nlocal total = 0\nfor i = 1, #tokens do total = total + 1 / i ^ 1.1; cdf[i] = total end\n\
                 function pick()\n  local u = math.random() * total\n  local lo, hi = 1, #tokens\n  \
                 while lo < hi do local mid = math.floor((lo + hi) / 2); if cdf[mid] < u then lo = mid + 1 else hi = mid end end\n  \
                 return tokens[lo]\nend\n",
            ),
        }
    }
    lua.push_str(&format!(
        "threads_made = 0\n\
         -- Each thread gets its own id (and seed): wrk's threads start within the same\n\
         -- second, so a seed from the clock alone repeats, and so would the POSTed names.\n\
         setup = function(thread) thread:set(\"thread_id\", threads_made); threads_made = threads_made + 1 end\n\
         init = function(args) math.randomseed(os.time() * 1000 + thread_id) end\n\
         request = function()\n  counter = counter + 1\n  local h = {{ [\"Content-Type\"] = \"application/json\" }}\n  \
         local t = pick()\n  if t then h[\"Authorization\"] = t end\n  \
         return wrk.format(\"{method}\", {path}, h, {body})\nend\n"
    ));
    let file = dir.join(format!(
        "{}-{shape:?}-{pick:?}.lua",
        if plain { "plain" } else { "tenantry" }
    ));
    std::fs::write(&file, lua).unwrap();
    file
}

/// A plain axum + sqlx server on one schema, no tenancy, serving the three shapes with the
/// same SQL shapes as tenantry's; `ping` as sqlx configures a pool by default.
async fn plain_server(stack: &Stack, schema: &str, pool_size: u32, ping: bool) -> u16 {
    use axum::{
        extract::{Path, State},
        routing::get,
        Json, Router,
    };
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .test_before_acquire(ping)
        .connect(&stack.database_url)
        .await
        .unwrap();
    let t = Arc::new(format!("\"{schema}\".projects"));
    type St = State<(sqlx::PgPool, Arc<String>)>;
    let app = Router::new()
        .route(
            "/projects/{id}",
            get(|State((pool, t)): St, Path(id): Path<String>| async move {
                let row: Option<String> = sqlx::query_scalar(&format!(
                    "SELECT row_to_json(_r)::text FROM (SELECT * FROM {t} WHERE id = CAST($1 AS bigint)) _r"
                ))
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap();
                row.unwrap_or_default()
            }),
        )
        .route(
            "/projects",
            get(|State((pool, t)): St| async move {
                let rows: String = sqlx::query_scalar(&format!(
                    "SELECT coalesce(json_agg(_r), '[]')::text FROM (SELECT * FROM {t} WHERE id >= CAST($1 AS bigint) LIMIT 10) _r"
                ))
                .bind("1")
                .fetch_one(&pool)
                .await
                .unwrap();
                rows
            })
            .post(|State((pool, t)): St, Json(v): Json<serde_json::Value>| async move {
                let row: String = sqlx::query_scalar(&format!(
                    "INSERT INTO {t} AS _t (name, description) VALUES ($1, $2) RETURNING row_to_json(_t)::text"
                ))
                .bind(v["name"].as_str().unwrap_or_default().to_string())
                .bind(v["description"].as_str().map(str::to_string))
                .fetch_one(&pool)
                .await
                .unwrap();
                (axum::http::StatusCode::CREATED, row)
            }),
        )
        .with_state((pool, t));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// tenantry's API, in-process, on a fresh gateway pool and registry (nothing cached), with a
/// count of answered requests.
pub struct Ours {
    pub port: u16,
    answered: Arc<AtomicI64>,
    pool: tenantry::api::Pool,
    started: Instant,
}

pub async fn start_ours(
    client: &Client,
    ns: &str,
    gateway_uri: &str,
    pool_size: u32,
    lifetime: Duration,
    tenant_share: u32,
) -> Ours {
    let started = Instant::now();
    let pool = tenantry::api::connect(
        gateway_uri,
        tenantry::api::PoolConfig {
            size: pool_size,
            acquire_timeout: Duration::from_secs(5),
            max_lifetime: lifetime,
            statement_cache: tenantry::api::pool::STATEMENT_CACHE,
            home_wait: Duration::from_millis(arg("--home-wait-ms", 20)),
        },
        false,
    )
    .await
    .unwrap();
    let config = tenantry::registry::Config {
        namespaces: vec![ns.to_string()],
        base_domain: None,
        signing_key: (ns.to_string(), "tenantry-signing-key".into()),
    };
    let (registry, _watch) = tenantry::registry::watch(client.clone(), &config);
    while !registry.is_synced() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settings = tenantry::api::Settings {
        auth: tenantry::api::auth::AuthConfig {
            leeway_secs: 30,
            ..Default::default()
        },
        limits: tenantry::api::Limits {
            tenant_max_concurrency: tenant_share,
            ..tenantry::api::Limits::default()
        },
        server: "default".into(),
    };
    let answered = Arc::new(AtomicI64::new(0));
    let count = answered.clone();
    let app = tenantry::api::router(tenantry::api::AppState::new(
        registry,
        pool.clone(),
        settings,
    ))
    .layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let count = count.clone();
            async move {
                let res = next.run(req).await;
                count.fetch_add(1, Ordering::Relaxed);
                res
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Ours {
        port,
        answered,
        pool,
        started,
    }
}

/// Runs wrk in a blocking thread so that the in-process servers keep their runtime.
async fn wrk_async(
    port: u16,
    script: &std::path::Path,
    seconds: u64,
    connections: u64,
) -> WrkResult {
    let script = script.to_path_buf();
    tokio::task::spawn_blocking(move || wrk(port, &script, seconds, connections))
        .await
        .unwrap()
}

/// Warms one server with 5-second wrk windows until two in a row are within 5 % of each other
/// (at least two windows, at most eight): the check that every (connection, statement) pair
/// has reached its steady state. Returns the windows run.
async fn warm(port: u16, script: &std::path::Path, connections: u64) -> usize {
    let mut last = wrk_async(port, script, 5, connections).await.rps;
    for windows in 2..=8 {
        let now = wrk_async(port, script, 5, connections).await.rps;
        if (now - last).abs() <= 0.05 * last.max(now) {
            return windows;
        }
        last = now;
    }
    8
}

fn fmt_run(r: &WrkResult) -> String {
    format!(
        "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms{}",
        r.rps,
        r.p50_ms,
        r.p99_ms,
        if r.non_2xx > 0 {
            format!(", {} non-2xx", r.non_2xx)
        } else {
            String::new()
        }
    )
}

/// Peak number of the gateway's connections seen while `f` runs.
async fn peak_connections<F: std::future::Future>(admin: &sqlx::PgPool, f: F) -> (F::Output, i64) {
    let peak = Arc::new(AtomicI64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (admin, peak, sampling) = (admin.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                let c: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'bench_gateway'",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                peak.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let out = f.await;
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    (out, peak.load(Ordering::SeqCst))
}

/// Private memory of the gateway's PostgreSQL backends (catalog and relation caches,
/// prepared statements), RssAnon from /proc: mean and largest.
async fn backend_memory(admin: &sqlx::PgPool) -> (f64, f64) {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE usename = 'bench_gateway'")
            .fetch_all(admin)
            .await
            .unwrap_or_default();
    let anon: Vec<u64> = pids
        .iter()
        .map(|p| rss_kb(*p as u32, "RssAnon:"))
        .filter(|k| *k > 0)
        .collect();
    if anon.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (
        anon.iter().sum::<u64>() as f64 / anon.len() as f64 / 1024.0,
        *anon.iter().max().unwrap() as f64 / 1024.0,
    )
}

/// Load average (1 min), to say how busy the machine was.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

pub(super) async fn api_bench(stack: &Stack, n: usize, conc: u16) -> String {
    let pool_size = arg("--pool", 16) as u32;
    let seconds = arg("--seconds", 10);
    let tenant_share = arg("--tenant-max-concurrency", 0) as u32;
    let only_get = std::env::args().any(|a| a == "--get-only");
    let connections = 32;
    let client = client(stack).await;
    let ns = format!("bench-api-{n}");
    namespace(&client, &ns).await;
    let op = Operator::start(stack, &client, &ns, conc, MigrationSet::embedded()).await;
    create_tenants(&client, &ns, n).await;
    wait_for(&client, &ns, n, |t| t.is_ready()).await;
    op.stop().await;

    let admin = PgPoolOptions::new()
        .max_connections(8)
        .connect(&stack.database_url)
        .await
        .unwrap();
    let schemas: Vec<String> = (0..n)
        .map(|i| tenantry::domain::naming::default_schema_name(&ns, &format!("t{i:05}")))
        .collect();
    futures::stream::iter(schemas.clone())
        .map(|s| {
            let admin = admin.clone();
            async move {
                sqlx::query(&format!("INSERT INTO \"{s}\".projects (name, description) VALUES ('project of {s}', 'benchmark row')"))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;

    // Tokens for every tenant in creation order (Zipf rank), signed with their Secrets' keys.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let list = secrets
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=tenantry"))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    let mut gateway_uri = String::new();
    for s in &list.items {
        let data = s.data.as_ref().unwrap();
        if let Some(key) = data.get("jwt-key") {
            let name = s
                .metadata
                .name
                .as_ref()
                .unwrap()
                .trim_end_matches("-db")
                .to_string();
            tokens.push((
                name.clone(),
                tenantry::cli::mint_token(&name, &key.0, "bench", 3600).unwrap(),
            ));
        } else if s.metadata.name.as_deref() == Some("tenantry-gateway") {
            gateway_uri = String::from_utf8(data["uri"].0.clone()).unwrap();
        }
    }
    tokens.sort();
    let tokens: Vec<String> = tokens.into_iter().map(|(_, t)| t).collect();
    assert_eq!(tokens.len(), n);
    let dir = tempfile::tempdir().unwrap();

    let plain_port = plain_server(stack, &schemas[0], pool_size, true).await;
    let noping_port = plain_server(stack, &schemas[0], pool_size, false).await;
    let ours = start_ours(
        &client,
        &ns,
        &gateway_uri,
        pool_size,
        Duration::from_secs(1800),
        tenant_share,
    )
    .await;
    let first = tokens[0].clone();
    assert_eq!(
        http_status(
            ours.port,
            "/v1/tables/projects/1",
            &[("Authorization", &format!("Bearer {first}"))]
        )
        .await,
        Some(200)
    );

    let share = if tenant_share == 0 {
        format!("{} (default rule)", (pool_size / 4).max(1))
    } else {
        tenant_share.to_string()
    };
    let mut rows = Vec::new();
    let mut cases = vec![(Shape::Get, Pick::Uniform), (Shape::Get, Pick::Zipf)];
    if !only_get {
        cases.extend([(Shape::List, Pick::Uniform), (Shape::Post, Pick::Uniform)]);
    }
    if std::env::args().any(|a| a == "--list-and-post") {
        cases = vec![(Shape::List, Pick::Uniform), (Shape::Post, Pick::Uniform)];
    }
    if std::env::args().any(|a| a == "--noisy-only") {
        cases.clear();
    }
    for (shape, pick) in cases {
        if n == 1 && pick == Pick::Zipf {
            continue; // one tenant: no choice to skew
        }
        let plain = script(dir.path(), shape, pick, &[]);
        let mine = script(dir.path(), shape, pick, &tokens);
        let mut windows = Vec::new();
        for (port, s) in [
            (plain_port, &plain),
            (noping_port, &plain),
            (ours.port, &mine),
        ] {
            windows.push(warm(port, s, connections).await);
        }
        let base = wrk_async(plain_port, &plain, seconds, connections).await;
        let noping = wrk_async(noping_port, &plain, seconds, connections).await;
        let (mine_run, peak) =
            peak_connections(&admin, wrk_async(ours.port, &mine, seconds, connections)).await;
        let (mean_mb, max_mb) = backend_memory(&admin).await;
        rows.push(format!(
            "| {} with JWT, {pick:?} tenant of {n} (wrk, {connections} connections, {seconds} s) | {} | plain axum + sqlx, one schema: {}; without the per-acquire ping: {} | {:.2}× / {:.2}× | pool {pool_size} ({} groups), per-tenant share {share}; peak gateway connections {peak}; backend private memory {mean_mb:.1} MB mean, {max_mb:.1} MB largest; warm-up windows (plain, no-ping, tenantry) {windows:?}; load {} |",
            shape.label(),
            fmt_run(&mine_run),
            fmt_run(&base),
            fmt_run(&noping),
            mine_run.rps / base.rps,
            mine_run.rps / noping.rps,
            ours.pool.groups(),
            load(),
        ));
    }
    if std::env::args().any(|a| a == "--noisy" || a == "--noisy-only") && n > 50 {
        rows.push(noisy_neighbour(ours.port, &tokens, &admin).await);
    }
    if std::env::args().any(|a| a == "--cold") {
        rows.extend(
            cold_and_recycle(
                &client,
                &ns,
                &gateway_uri,
                stack,
                &schemas[0],
                pool_size,
                tenant_share,
                &tokens,
                dir.path(),
                connections,
            )
            .await,
        );
    }
    rows.join("\n")
}

/// One keep-alive HTTP/1.1 connection sending GETs with a bearer token; returns the status.
pub struct Http {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
}

impl Http {
    pub async fn connect(port: u16) -> Self {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            stream: tokio::io::BufStream::new(s),
        }
    }

    pub async fn get(&mut self, path: &str, token: &str) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        self.stream.write_all(req.as_bytes()).await.unwrap();
        self.stream.flush().await.unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).await.unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await.unwrap();
        status
    }
}

/// [`open_loop`] on a runtime of its own (two threads), so that the load's tasks do not
/// queue behind the API's on the bench's runtime.
async fn open_loop_apart(
    port: u16,
    tokens: Vec<String>,
    rate: f64,
    seconds: u64,
    conns_per_token: usize,
) -> (Vec<f64>, usize) {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(open_loop(port, &tokens, rate, seconds, conns_per_token))
    })
    .await
    .unwrap()
}

/// Open-loop load: each of `tokens` sends `rate` GETs per second for `seconds` on one
/// connection of its own, on a fixed schedule; each latency is measured from the request's
/// scheduled time (so a late answer also delays, and is charged to, the requests queued
/// behind it). Returns the latencies in ms and the count of non-2xx answers.
async fn open_loop(
    port: u16,
    tokens: &[String],
    rate: f64,
    seconds: u64,
    conns_per_token: usize,
) -> (Vec<f64>, usize) {
    let mut tasks = Vec::new();
    for t in tokens {
        for c in 0..conns_per_token {
            let t = t.clone();
            let period = Duration::from_secs_f64(conns_per_token as f64 / rate);
            // Spread the connections' schedules over one period.
            let offset =
                period.mul_f64((c as f64 + rand::random::<f64>()) / conns_per_token as f64);
            tasks.push(tokio::spawn(async move {
                let mut http = Http::connect(port).await;
                let start = tokio::time::Instant::now() + offset;
                let end = start + Duration::from_secs(seconds);
                let mut tick = tokio::time::interval_at(start, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let (mut lat, mut bad) = (Vec::new(), 0);
                loop {
                    let at = tick.tick().await;
                    if at >= end {
                        break;
                    }
                    let status = http.get("/v1/tables/projects/1", &t).await;
                    lat.push(at.elapsed().as_secs_f64() * 1000.0);
                    bad += usize::from(!(200..300).contains(&status));
                }
                (lat, bad)
            }));
        }
    }
    let mut all = Vec::new();
    let mut bad = 0;
    for t in tasks {
        let (l, b) = t.await.unwrap();
        all.extend(l);
        bad += b;
    }
    all.sort_by(|a, b| a.total_cmp(b));
    (all, bad)
}

pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Noisy neighbour: 50 quiet tenants at 10 GETs/s each (open loop), alone and then beside one
/// tenant driven at 100 times that (1,000 GETs/s, open loop), and beside the same tenant
/// flooding with wrk (32 connections, closed loop, as fast as the API answers it); the quiet
/// tenants' p99 in each, and the gateway's connections.
async fn noisy_neighbour(port: u16, tokens: &[String], admin: &sqlx::PgPool) -> String {
    let quiet = tokens[1..51].to_vec();
    let noisy = tokens[0].clone();
    let seconds = 15;
    // Warm-up, not measured: every quiet tenant and the noisy one served for 10 s, so that
    // each has its statements prepared on the connections it uses before anything is timed.
    let _ = tokio::join!(
        open_loop_apart(port, quiet.clone(), 10.0, 10, 1),
        open_loop_apart(port, vec![noisy.clone()], 1000.0, 10, 16)
    );
    let (alone, alone_bad) = open_loop_apart(port, quiet.clone(), 10.0, seconds, 1).await;
    let ((beside, beside_bad), peak) = peak_connections(admin, async {
        let (q, n) = tokio::join!(
            open_loop_apart(port, quiet.clone(), 10.0, seconds, 1),
            open_loop_apart(port, vec![noisy.clone()], 1000.0, seconds, 16)
        );
        let _ = n;
        q
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let flood_script = script(
        dir.path(),
        Shape::Get,
        Pick::Uniform,
        std::slice::from_ref(&noisy),
    );
    let ((flooded, flooded_bad), flood) = tokio::join!(
        open_loop_apart(port, quiet.clone(), 10.0, seconds, 1),
        wrk_async(port, &flood_script, seconds, 32)
    );
    format!(
        "| noisy neighbour: 50 quiet tenants at 10 GET/s each (open loop, {seconds} s) | quiet p99 beside one tenant at 1,000 GET/s: {:.2} ms (p50 {:.2}, {} non-2xx); beside one tenant flooding (wrk, 32 connections: {:.0} req/s, {} non-2xx): {:.2} ms (p50 {:.2}, {} non-2xx) | quiet tenants alone: p99 {:.2} ms (p50 {:.2}, {} non-2xx) | {:.2}× / {:.2}× | peak gateway connections beside the 1,000 GET/s tenant {peak}; load {} |",
        pct(&beside, 0.99),
        pct(&beside, 0.5),
        beside_bad,
        flood.rps,
        flood.non_2xx,
        pct(&flooded, 0.99),
        pct(&flooded, 0.5),
        flooded_bad,
        pct(&alone, 0.99),
        pct(&alone, 0.5),
        alone_bad,
        pct(&beside, 0.99) / pct(&alone, 0.99),
        pct(&flooded, 0.99) / pct(&alone, 0.99),
        load(),
    )
}

/// Throughput per second of a server while `wrk` runs `seconds` against it: requests
/// answered each second (read from `answered`) and connections opened (from `opened`).
async fn per_second(
    port: u16,
    script: &std::path::Path,
    seconds: u64,
    connections: u64,
    answered: impl Fn() -> i64,
    opened: impl Fn() -> u64,
) -> (WrkResult, Vec<(i64, u64)>) {
    let script = script.to_path_buf();
    let run = tokio::spawn(async move { wrk_async(port, &script, seconds, connections).await });
    let mut series = Vec::new();
    let (mut a0, mut o0) = (answered(), opened());
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    for _ in 0..seconds {
        tick.tick().await;
        let (a, o) = (answered(), opened());
        series.push((a - a0, o - o0));
        (a0, o0) = (a, o);
    }
    (run.await.unwrap(), series)
}

/// Cold start (the first 15 s after a fresh API, and a fresh plain server, start) and
/// connection recycling (throughput per second around recycles).
#[allow(clippy::too_many_arguments)]
async fn cold_and_recycle(
    client: &Client,
    ns: &str,
    gateway_uri: &str,
    stack: &Stack,
    schema: &str,
    pool_size: u32,
    tenant_share: u32,
    tokens: &[String],
    dir: &std::path::Path,
    connections: u64,
) -> Vec<String> {
    let n = tokens.len();
    let mine = script(dir, Shape::Get, Pick::Uniform, tokens);
    let plain = script(dir, Shape::Get, Pick::Uniform, &[]);
    let mut rows = Vec::new();

    // Cold: fresh servers (new pools, new backends, empty caches), measured from the moment
    // each answers its first request.
    let fresh_plain = plain_server(stack, schema, pool_size, true).await;
    let fresh_noping = plain_server(stack, schema, pool_size, false).await;
    let base = wrk_async(fresh_plain, &plain, 15, connections).await;
    let noping = wrk_async(fresh_noping, &plain, 15, connections).await;
    let fresh = start_ours(
        client,
        ns,
        gateway_uri,
        pool_size,
        Duration::from_secs(1800),
        tenant_share,
    )
    .await;
    let ready = fresh.started.elapsed();
    let (cold, series) = per_second(
        fresh.port,
        &mine,
        15,
        connections,
        || fresh.answered.load(Ordering::Relaxed),
        || fresh.pool.opened(),
    )
    .await;
    rows.push(format!(
        "| cold start: GET by primary key with JWT, uniform tenant of {n}, the first 15 s after start (wrk, {connections} connections) | {} | fresh plain axum + sqlx: {}; without the ping: {} | {:.2}× / {:.2}× | API start → registry synced {:.2} s (not counted); requests per second: {:?}; load {} |",
        fmt_run(&cold),
        fmt_run(&base),
        fmt_run(&noping),
        cold.rps / base.rps,
        cold.rps / noping.rps,
        ready.as_secs_f64(),
        series.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        load(),
    ));

    // Recycle: connections live 20 s (less up to a quarter, at random); 45 s of load after a
    // 15 s warm-up shows each connection replaced about twice.
    let recycling = start_ours(
        client,
        ns,
        gateway_uri,
        pool_size,
        Duration::from_secs(20),
        tenant_share,
    )
    .await;
    let _ = wrk_async(recycling.port, &mine, 15, connections).await;
    let (run, series) = per_second(
        recycling.port,
        &mine,
        45,
        connections,
        || recycling.answered.load(Ordering::Relaxed),
        || recycling.pool.opened(),
    )
    .await;
    let steady: Vec<i64> = series
        .iter()
        .filter(|(_, o)| *o == 0)
        .map(|(a, _)| *a)
        .collect();
    let around: Vec<i64> = series
        .iter()
        .filter(|(_, o)| *o > 0)
        .map(|(a, _)| *a)
        .collect();
    let median = |v: &[i64]| {
        let mut v = v.to_vec();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    rows.push(format!(
        "| recycle: GET by primary key with JWT, uniform tenant of {n}, connection lifetime 20 s, 45 s (wrk, {connections} connections) | {} | seconds without a recycle: median {} req/s, min {} | seconds with a recycle: median {} req/s, min {} ({} of {}) | per second (req/s, connections opened): {:?}; load {} |",
        fmt_run(&run),
        median(&steady),
        steady.iter().min().copied().unwrap_or(0),
        median(&around),
        around.iter().min().copied().unwrap_or(0),
        around.len(),
        series.len(),
        series,
        load(),
    ));
    rows
}

fn rss_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub(super) async fn registry_bench(stack: &Stack, n: usize) -> String {
    let client = client(stack).await;
    let ns = format!("bench-registry-{n}");
    namespace(&client, &ns).await;
    let created = Instant::now();
    create_tenants(&client, &ns, n).await;
    let create_time = created.elapsed();

    // A non-superuser login for the API process.
    let gw = Ident::parse_role("bench_registry_gateway").unwrap();
    let mut admin = Admin::new(&stack.database_url, 2, None, None)
        .unwrap()
        .with_gateway(Some(gw));
    admin.bootstrap().await.unwrap();
    admin
        .ensure_gateway("benchpassword0123456789")
        .await
        .unwrap();
    let rest = stack.database_url.split_once('@').unwrap().1;
    let url = format!("postgres://bench_registry_gateway:benchpassword0123456789@{rest}");
    // The platform signing key, as the operator would have created it.
    let platform_key = "p".repeat(64);
    let signing = k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some("tenantry-signing-key".into()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        data: Some(
            [(
                "key".to_string(),
                k8s_openapi::ByteString(platform_key.clone().into_bytes()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let _ = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &signing)
        .await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args([
            "api",
            "--namespace",
            &ns,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "warn",
            "--signing-key-secret-namespace",
            &ns,
        ])
        .env("DATABASE_URL", &url)
        .env("KUBECONFIG", &stack.kubeconfig)
        .spawn()
        .unwrap();
    while http_status(port, "/readyz", &[]).await != Some(200) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sync = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kb(child.id(), "VmRSS:");
    let hwm = rss_kb(child.id(), "VmHWM:");

    // Baseline: one full list of the same Tenants with kubectl.
    let listed = Instant::now();
    let out = Command::new("kubectl")
        .args(["get", "tenants", "-n", &ns, "-o", "name"])
        .env("KUBECONFIG", &stack.kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list_time = listed.elapsed();

    // Ready → routable: act as the operator for one new Tenant (status Ready); its token key
    // is derived from the platform key and its uid, as the operator's would be.
    let api: Api<Tenant> = Api::namespaced(client.clone(), &ns);
    let fresh = api
        .create(&PostParams::default(), &Tenant::test("fresh"))
        .await
        .unwrap();
    let key = tenantry::domain::credentials::derive_jwt_key(
        platform_key.as_bytes(),
        fresh.metadata.uid.as_deref().unwrap(),
    );
    let token = tenantry::cli::mint_token("fresh", key.as_bytes(), "bench", 600).unwrap();
    let auth = format!("Bearer {token}");
    let status = serde_json::json!({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
        "status": {"phase": "Ready", "observedGeneration": 1, "schema": "fresh_schema", "secretName": "fresh-db",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned", "message": "bench", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    });
    api.patch_status(
        "fresh",
        &kube::api::PatchParams::apply("bench").force(),
        &kube::api::Patch::Apply(status),
    )
    .await
    .unwrap();
    let ready_at = Instant::now();
    while http_status(port, "/v1/tenant", &[("Authorization", &auth)]).await != Some(200) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let routable = ready_at.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    format!(
        "| registry: {n} Tenants → first full sync (API process start → /readyz) | {:.2} s; RSS {:.1} MB (peak {:.1} MB); Ready → routable {:.0} ms | kubectl get of the same {n} Tenants: {:.2} s | {:.2}× of kubectl | goals: sync ≤ 5 s, ≤ 100 MB, routable ≤ 1 s; creating the {n} Tenants took {:.1} s |",
        sync.as_secs_f64(),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        routable.as_secs_f64() * 1000.0,
        list_time.as_secs_f64(),
        ratio(sync, list_time),
        create_time.as_secs_f64()
    )
}
