//! End to end, as a user does it: kubectl applies the CRD and the examples, the real
//! `tenantry` binary runs as a process, kubectl waits for Ready and deletes.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::common::*;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_the_binary_provision_and_delete_the_examples() {
    let env = env();
    let ns = TestNs::new().await;
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", "crds/"]);
    let port = free_port();
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("tenantry-e2e-{}.log", ns.name)))
            .unwrap();
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args([
                "controller",
                "--namespace",
                &ns.name,
                "--health-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--log-format", "json"])
            .env("DATABASE_URL", &env.database_url)
            .env("KUBECONFIG", &env.kubeconfig)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tenantry controller"),
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

    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "tenantry_tenants{{phase=\"Ready\"}} {}",
            examples.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("tenantry_reconciliations_total{result=\"ok\"}"),
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
