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

pub(super) async fn api_bench(stack: &Stack, n: usize, conc: u16) -> String {
    use axum::{
        extract::{Path, State},
        routing::get,
        Router,
    };
    let pool_size = arg("--pool", 16) as u32;
    let seconds = arg("--seconds", 10);
    let tenant_share = arg("--tenant-max-concurrency", 0) as u32;
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

    // Tokens for every tenant, signed with the keys from their Secrets.
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
            tokens.push(tenantry::cli::mint_token(&name, &key.0, "bench", 3600).unwrap());
        } else if s.metadata.name.as_deref() == Some("tenantry-gateway") {
            gateway_uri = String::from_utf8(data["uri"].0.clone()).unwrap();
        }
    }
    assert_eq!(tokens.len(), n);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tenantry.lua");
    let lua_tokens: Vec<String> = tokens.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        &script,
        format!(
            "tokens = {{ {} }}\nrequest = function()\n  local t = tokens[math.random(#tokens)]\n  return wrk.format(\"GET\", \"/v1/tables/projects/1\", {{ [\"Authorization\"] = \"Bearer \" .. t }})\nend\n",
            lua_tokens.join(", ")
        ),
    )
    .unwrap();
    let plain_script = dir.path().join("plain.lua");
    std::fs::write(
        &plain_script,
        "request = function()\n  return wrk.format(\"GET\", \"/projects/1\")\nend\n",
    )
    .unwrap();

    // Baselines: plain axum + sqlx, the same primary-key read on one schema, no tenancy; once
    // as sqlx configures a pool by default (a ping before every acquire), once without it.
    let table = Arc::new(format!("\"{}\".projects", schemas[0]));
    let mut plain_ports = Vec::new();
    for ping in [true, false] {
        let plain_pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .test_before_acquire(ping)
            .connect(&stack.database_url)
            .await
            .unwrap();
        let plain = Router::new()
            .route(
                "/projects/{id}",
                get(|State((pool, table)): State<(sqlx::PgPool, Arc<String>)>, Path(id): Path<String>| async move {
                    let row: Option<String> = sqlx::query_scalar(&format!(
                        "SELECT row_to_json(_r)::text FROM (SELECT * FROM {table} WHERE id = CAST($1 AS bigint)) _r"
                    ))
                    .bind(id)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
                    row.unwrap_or_default()
                }),
            )
            .with_state((plain_pool, table.clone()));
        let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        plain_ports.push(plain_listener.local_addr().unwrap().port());
        tokio::spawn(async move { axum::serve(plain_listener, plain).await.unwrap() });
    }
    let (plain_port, noping_port) = (plain_ports[0], plain_ports[1]);

    // tenantry's API, in-process, on the gateway pool.
    let pool = tenantry::api::connect(
        &gateway_uri,
        tenantry::api::PoolConfig {
            size: pool_size,
            acquire_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(1800),
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
    };
    let app = tenantry::api::router(tenantry::api::AppState::new(
        registry,
        pool.clone(),
        settings,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let first = tokens[0].clone();
    assert_eq!(
        http_status(
            port,
            "/v1/tables/projects/1",
            &[("Authorization", &format!("Bearer {first}"))]
        )
        .await,
        Some(200)
    );

    // Warm all three equally (prepared statements, catalog caches), then measure.
    for p in [plain_port, noping_port] {
        let _ = wrk(p, &plain_script, seconds, connections);
    }
    let _ = wrk(port, &script, seconds, connections);
    let base = wrk(plain_port, &plain_script, seconds, connections);
    let noping = wrk(noping_port, &plain_script, seconds, connections);
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
    let ours = tokio::task::spawn_blocking({
        let script = script.clone();
        move || wrk(port, &script, seconds, connections)
    })
    .await
    .unwrap();
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    // Private memory of the API's PostgreSQL backends after visiting many tenant schemas
    // (catalog and relation caches, prepared statements): RssAnon from /proc.
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE usename = 'bench_gateway'")
            .fetch_all(&admin)
            .await
            .unwrap_or_default();
    let anon: Vec<u64> = pids
        .iter()
        .map(|p| rss_kb(*p as u32, "RssAnon:"))
        .filter(|k| *k > 0)
        .collect();
    let backend_mb = if anon.is_empty() {
        f64::NAN
    } else {
        anon.iter().sum::<u64>() as f64 / anon.len() as f64 / 1024.0
    };
    format!(
        "| GET by primary key with JWT, random tenant of {n} (wrk, {connections} connections, {seconds} s) | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} non-2xx | plain axum + sqlx, one schema: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms; same without the per-acquire ping: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | {:.2}× / {:.2}× | pool {pool_size}, per-tenant share {share}; peak gateway connections {}; backend private memory {:.1} MB each |",
        ours.rps,
        ours.p50_ms,
        ours.p99_ms,
        ours.non_2xx,
        base.rps,
        base.p50_ms,
        base.p99_ms,
        noping.rps,
        noping.p50_ms,
        noping.p99_ms,
        ours.rps / base.rps,
        ours.rps / noping.rps,
        peak.load(Ordering::SeqCst),
        backend_mb,
        share = if tenant_share == 0 {
            format!("{} (default rule)", (pool_size / 4).max(1))
        } else {
            tenant_share.to_string()
        }
    )
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
