//! End to end, as a user does it: kubectl applies the CRD and the examples, the real
//! `tenantry` binary runs as a process, kubectl waits for Ready and deletes.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::*;

pub(crate) async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, &[], None).await
}

/// A minimal HTTP/1.1 client: status and the whole response text.
pub(crate) async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: localhost\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf))
}

pub(crate) fn spawn_logged(args: &[&str], envs: &[(&str, &str)], log_name: &str) -> Proc {
    let log = std::fs::File::create(std::env::temp_dir().join(log_name)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantry"));
    cmd.args(args)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("start tenantry"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_the_binary_provision_and_delete_the_examples() {
    let env = env();
    let ns = TestNs::new().await;
    kubectl_ok(&[
        "apply",
        "--validate=false", // a 1.20 apiserver: see tests/support/stack.rs
        "-f",
        "crds/",
    ]);
    let port = free_port();
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let health = format!("127.0.0.1:{port}");
    let _op = spawn_logged(
        &[
            "controller",
            "--demo-migrations", // the examples' API calls read the demo tables
            "--namespace",
            &ns.name,
            "--health-addr",
            &health,
            "--log-format",
            "json",
            "--gateway-secret-namespace",
            &ns.name,
            "--signing-key-secret-namespace",
            &ns.name,
        ],
        &[
            ("DATABASE_URL", &env.database_url),
            ("KUBECONFIG", &kubeconfig),
        ],
        &format!("tenantry-e2e-{}.log", ns.name),
    );

    eventually(
        "operator /readyz",
        Duration::from_secs(30),
        move || async move { http_get(port, "/readyz").await.filter(|(c, _)| *c == 200) },
    )
    .await;
    let (code, _) = http_get(port, "/healthz").await.unwrap();
    assert_eq!(code, 200);

    let examples: Vec<String> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("tenant-") && f.ends_with(".yaml"))
        .map(|f| format!("examples/{f}"))
        .collect();
    assert!(examples.len() >= 3, "{examples:?}");
    for f in &examples {
        kubectl_ok(&["apply", "-n", &ns.name, "-f", f]);
    }
    kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "tenants",
        "--all",
        "-n",
        &ns.name,
        "--timeout=90s",
    ]);
    let out = kubectl_ok(&["get", "tn", "-n", &ns.name]);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains(" True ") && l.contains("Ready"))
            .count(),
        examples.len(),
        "{out}"
    );
    let described = kubectl_ok(&["describe", "tenant", "acme", "-n", &ns.name]);
    assert!(described.contains("Provisioned"), "{described}");

    // The API binary, logged in as the gateway role from the operator's Secret, serves them.
    let gateway = ns.secrets().get("tenantry-gateway").await.unwrap();
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let ops_port = free_port();
    let metrics_listen = format!("127.0.0.1:{ops_port}");
    let _api = spawn_logged(
        &[
            "api",
            "--namespace",
            &ns.name,
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics_listen,
            "--base-domain",
            "tenants.test",
            "--pool-size",
            "4",
            "--signing-key-secret-namespace",
            &ns.name,
        ],
        &[
            ("DATABASE_URL", &secret_value(&gateway, "uri")),
            ("KUBECONFIG", &kubeconfig),
        ],
        &format!("tenantry-e2e-api-{}.log", ns.name),
    );
    eventually("api /readyz", Duration::from_secs(30), move || async move {
        http_get(api_port, "/readyz")
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args(["token", "acme", "-n", &ns.name])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let auth = format!("Bearer {token}");
    let acme_host = "acme.tenants.test";
    let (code, text) = http(
        api_port,
        "POST",
        "/v1/tables/projects",
        &[("Host", acme_host), ("Authorization", &auth)],
        Some(r#"{"name":"from e2e"}"#),
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{text}");
    let (code, text) = http(
        api_port,
        "GET",
        "/v1/tables/projects?select=name",
        &[("Host", acme_host), ("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with(r#"[{"name":"from e2e"}]"#), "{text}");
    // The same token on globex's host is refused.
    let (code, text) = http(
        api_port,
        "GET",
        "/v1/tables/projects",
        &[("Host", "globex.example.com"), ("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 403, "{text}");
    // Metrics are on their own port, not beside tenant traffic.
    let (code, _) = http_get(api_port, "/metrics").await.unwrap();
    assert_eq!(code, 404);
    let (code, text) = http_get(ops_port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("tenantry_api_registry_tenants 3"), "{text}");
    assert!(text.contains(r#"route="/v1/tables/{table}""#), "{text}");

    // JSON logs carry the reconcile's namespace, name and tenant at the top level.
    let log =
        std::fs::read_to_string(std::env::temp_dir().join(format!("tenantry-e2e-{}.log", ns.name)))
            .unwrap();
    assert!(
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["message"] == "tenant provisioned"
                && v["namespace"] == ns.name.as_str()
                && v["name"].is_string()
                && v["tenant"] == v["name"]),
        "{log}"
    );

    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "tenantry_tenants{{phase=\"Ready\"}} {}",
            examples.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("tenantry_reconcile_total{result=\"ok\"}"),
        "{metrics}"
    );

    for f in &examples {
        kubectl_ok(&["delete", "-n", &ns.name, "-f", f, "--timeout=60s"]);
    }
    let out = kubectl_ok(&["get", "tenants", "-n", &ns.name, "-o", "name"]);
    assert_eq!(out.trim(), "");

    // Retain (the default) kept the data of acme and globex; Delete dropped the trial's.
    let pg = pg().await;
    let mut kept: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname = ANY($1) ORDER BY 1",
    )
    .bind(vec![
        ns.schema("acme"),
        "globex".to_string(),
        ns.schema("trial-initech"),
    ])
    .fetch_all(&pg)
    .await
    .unwrap();
    kept.sort();
    let mut want = vec![ns.schema("acme"), "globex".to_string()];
    want.sort();
    assert_eq!(kept, want);
    // The fixed schema name of the full example would conflict with a later run on a reused
    // database; clean up as an administrator would.
    sqlx::Executor::execute(&pg, "DROP SCHEMA globex CASCADE; DROP ROLE globex")
        .await
        .unwrap();
}

fn reconciliations(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tenantry_reconcile_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies() {
    let env = env();
    let ns = TestNs::new().await;
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let gateway = format!("gw_{}", ns.name.replace('-', "_"));
    let start = |id: &'static str, port: u16| {
        let health = format!("127.0.0.1:{port}");
        spawn_logged(
            &[
                "controller",
                "--namespace",
                &ns.name,
                "--health-addr",
                &health,
                "--leader-election",
                "--lease-namespace",
                &ns.name,
                "--lease-duration-secs",
                "4",
                "--gateway-role",
                &gateway,
                "--gateway-secret-namespace",
                &ns.name,
            ],
            &[
                ("DATABASE_URL", env.database_url.as_str()),
                ("KUBECONFIG", kubeconfig.as_str()),
                ("POD_NAME", id),
            ],
            &format!("tenantry-e2e-{}-{id}.log", ns.name),
        )
    };
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start("op-a", port_a);
    eventually("op-a ready", Duration::from_secs(30), move || async move {
        http_get(port_a, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    let b = start("op-b", port_b);
    // A standby is ready (so rollouts proceed) but says so and does not reconcile.
    let (_, body) = eventually("op-b ready", Duration::from_secs(30), move || async move {
        http_get(port_b, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    assert!(body.ends_with("standby\n"), "{body}");
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(ns.client.clone(), &ns.name);
    let holder = |l: &k8s_openapi::api::coordination::v1::Lease| {
        l.spec.as_ref().and_then(|s| s.holder_identity.clone())
    };
    assert_eq!(
        holder(&leases.get("tenantry-operator").await.unwrap()).as_deref(),
        Some("op-a")
    );

    ns.create(tenantry::domain::crd::Tenant::test("before"))
        .await;
    wait_ready(&ns, "before").await;
    let (_, m) = http_get(port_b, "/metrics").await.unwrap();
    assert_eq!(reconciliations(&m), 0, "the standby must not reconcile");
    assert!(m.contains("tenantry_leader 0"), "{m}");
    assert!(m.contains("tenantry_build_info{version="), "{m}");
    let (_, m) = http_get(port_a, "/metrics").await.unwrap();
    assert!(m.contains("tenantry_leader 1"), "{m}");

    // The leader dies without releasing the lease; the standby takes over within its duration.
    let _ = a.0.kill();
    let _ = a.0.wait();
    let killed = std::time::Instant::now();
    let l = leases.clone();
    eventually("op-b holds the lease", Duration::from_secs(15), move || {
        let l = l.clone();
        async move {
            let lease = l.get("tenantry-operator").await.ok()?;
            (lease.spec?.holder_identity.as_deref() == Some("op-b")).then_some(())
        }
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(4 + 3), "takeover took {took:?}");
    ns.create(tenantry::domain::crd::Tenant::test("after"))
        .await;
    wait_ready(&ns, "after").await;
    let (_, m) = http_get(port_b, "/metrics").await.unwrap();
    assert!(reconciliations(&m) > 0);
    assert!(m.contains("tenantry_leader 1"), "{m}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_migration_flag_tenants_get_an_empty_schema() {
    let env = env();
    let ns = TestNs::new().await;
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let health = format!("127.0.0.1:{}", free_port());
    let _op = spawn_logged(
        &[
            "controller",
            "--namespace",
            &ns.name,
            "--health-addr",
            &health,
            "--gateway-role",
            &gateway_role(&ns),
            "--gateway-secret-namespace",
            &ns.name,
            "--signing-key-secret-namespace",
            &ns.name,
        ],
        &[
            ("DATABASE_URL", &env.database_url),
            ("KUBECONFIG", &kubeconfig),
        ],
        &format!("tenantry-e2e-empty-{}.log", ns.name),
    );
    ns.create(tenantry::domain::crd::Tenant::test("blank"))
        .await;
    let t = wait_ready(&ns, "blank").await;
    let status = t.status.unwrap();
    assert_eq!(status.migration_version, None, "no demo tables by default");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename <> 'tenantry_migrations'",
    )
    .bind(status.schema.unwrap())
    .fetch_one(&pg().await)
    .await
    .unwrap();
    assert_eq!(tables, 0);
}
