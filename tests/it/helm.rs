//! The Helm chart, with the real Helm v4 engine (helm-python-sdk): lint and render for default
//! and all-options values, bad values refused, CRDs identical to the generated ones, and an
//! install into the test apiserver whose ServiceAccounts' RBAC is proven by running the
//! operator and the API with their tokens, exactly as the chart's Deployments run them.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};

use crate::common::*;

#[track_caller]
fn check_py(args: &[&str]) -> String {
    let out = Command::new(helm_python())
        .arg(repo().join("tests/helm/check.py"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run tests/helm/check.py (scripts/setup.sh installs helm-python-sdk)");
    assert!(
        out.status.success(),
        "check.py {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chart_lints_and_renders_for_default_and_all_options() {
    let out = check_py(&["lint", "charts/tenantry", "tests/helm/values-all.yaml"]);
    assert!(out.contains(r#""values": "defaults""#), "{out}");
    for kind in [
        "ServiceMonitor",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ConfigMap",
        "CustomResourceDefinition",
    ] {
        assert!(out.contains(kind), "all-options render lacks {kind}: {out}");
    }
    // Default values choose no migration set: tenants get an empty schema, not the demo tables.
    let out = check_py(&["render", "charts/tenantry"]);
    assert!(
        !out.contains("- --demo-migrations") && !out.contains("- --migrations-dir"),
        "{out}"
    );
    let out = check_py(&["bad", "charts/tenantry"]);
    assert_eq!(out.matches("refused as expected").count(), 7, "{out}");
}

#[test]
fn the_chart_readme_describes_every_value() {
    // `check.py readme` refuses a value without a description (its own comment or its
    // parent's); the committed README is its current output.
    let generated = check_py(&["readme", "charts/tenantry"]);
    let committed = std::fs::read_to_string(repo().join("charts/tenantry/README.md")).unwrap();
    assert!(
        generated == committed,
        "charts/tenantry/README.md is stale: tests/helm/check.py readme charts/tenantry > charts/tenantry/README.md"
    );
    assert!(committed.contains("| `watchNamespaces` |"), "{committed}");
}

#[test]
fn chart_crds_are_the_generated_ones() {
    for file in ["tenant.yaml", "tenantrollout.yaml", "postgresserver.yaml"] {
        let chart = std::fs::read(repo().join("charts/tenantry/files/crds").join(file)).unwrap();
        let root = std::fs::read(repo().join("crds").join(file)).unwrap();
        assert!(
            chart == root,
            "charts/tenantry/files/crds/{file} differs from crds/{file}: copy it"
        );
    }
    // The chart's template renders them, labelled and kept on uninstall.
    let out = check_py(&["crd", "charts/tenantry"]);
    // Helm re-serializes whole floats (`10000.0`, as k8s-openapi writes bounds) as integers.
    fn whole(v: Value) -> Value {
        match v {
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() && f.fract() == 0.0 => Value::Number((f as i64).into()),
                _ => Value::Number(n),
            },
            Value::Array(s) => Value::Array(s.into_iter().map(whole).collect()),
            Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, whole(v))).collect()),
            other => other,
        }
    }
    let rendered: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| whole(<Value as serde::Deserialize>::deserialize(d).unwrap()))
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(rendered.len(), 3, "{out}");
    for (file, rendered) in ["tenant.yaml", "tenantrollout.yaml", "postgresserver.yaml"]
        .iter()
        .zip(&rendered)
    {
        let root = std::fs::read(repo().join("crds").join(file)).unwrap();
        let generated: Value = whole(serde_yaml::from_slice(&root).unwrap());
        assert_eq!(rendered["spec"], generated["spec"], "{file}");
        assert_eq!(
            rendered["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "Helm"
        );
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_binaries_expose() {
    let text =
        std::fs::read_to_string(repo().join("charts/tenantry/dashboards/tenantry.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    // Metric families, as `# TYPE <name> <kind>` lines name them.
    let exposed: std::collections::BTreeSet<String> = [
        tenantry::telemetry::Metrics::default().encode(),
        tenantry::api::ApiMetrics::default().encode(),
    ]
    .iter()
    .flat_map(|t| t.lines())
    .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
    .map(str::to_string)
    .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("tenantry_") {
                    continue;
                }
                let family = ["_bucket", "_total", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    exposed.contains(family),
                    "{word} in {expr:?}; exposed: {exposed:?}"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "{queried}");
}

/// A kubeconfig that authenticates with `token` (a ServiceAccount's, from TokenRequest).
fn token_kubeconfig(token: &str, dir: &std::path::Path, name: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&env().kubeconfig).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_string();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

/// Starts the `tenantry` binary with the container spec of a Deployment the chart installed:
/// its args and plain env, `fieldRef` env filled in, `secretKeyRef` env from `secret_env`.
fn run_like_deployment(
    deploy: &Value,
    kubeconfig: &PathBuf,
    secret_env: &[(&str, String)],
    overrides: &[(&str, String)],
    log: &str,
) -> Proc {
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for (flag, value) in overrides {
        args.retain(|a| !a.starts_with(&format!("{flag}=")));
        args.push(format!("{flag}={value}"));
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantry"));
    cmd.args(&args).env("KUBECONFIG", kubeconfig);
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if let Some(v) = e["value"].as_str() {
            cmd.env(name, v);
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let v = match path {
                "metadata.name" => "tenantry-under-test".to_string(),
                "metadata.namespace" => deploy["metadata"]["namespace"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                other => panic!("unexpected fieldRef {other}"),
            };
            cmd.env(name, v);
        } else {
            let (_, v) = secret_env
                .iter()
                .find(|(k, _)| *k == name)
                .unwrap_or_else(|| panic!("no value for {name}"));
            cmd.env(name, v);
        }
    }
    let logf = std::fs::File::create(std::env::temp_dir().join(log)).unwrap();
    cmd.stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf));
    Proc(cmd.spawn().unwrap())
}

/// Waits until `/readyz` on `port` answers 200.
async fn ready_at(port: u16, what: &str) {
    eventually(
        &format!("{what} ready"),
        Duration::from_secs(30),
        move || async move {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://127.0.0.1:{port}/readyz"))
                .output()
                .await
                .ok()?;
            (out.stdout == b"200").then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_is_sufficient_for_operator_and_api() {
    let env = env();
    // Two watched namespaces: a Role in each, one watch in each, both served.
    let tenants_ns = TestNs::new().await;
    let other_ns = TestNs::new().await;
    let release_ns = format!("tenantry-system-{}", random_suffix());
    let release = "tenantry";
    let gateway_role = format!("gw_{}", release_ns.replace('-', "_"));
    kubectl_ok(&["create", "namespace", &release_ns]);
    kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "tenantry-db",
        "-n",
        &release_ns,
        &format!("--from-literal=url={}", env.database_url),
    ]);
    // The application's migrations, after the demo set: none yet.
    kubectl_ok(&[
        "create",
        "configmap",
        "tenant-migrations",
        "-n",
        &release_ns,
    ]);
    let values = json!({
        "database": {"existingSecret": "tenantry-db"},
        "watchNamespaces": [tenants_ns.name, other_ns.name],
        // The test reads the demo tables through the API: ask for them (never the default).
        "migrations": {"demo": true, "configMap": "tenant-migrations"},
        // The test apiserver (1.20) takes the CRD only by a plain apply, which the test stack
        // made (README, "Admission rules").
        "crds": {"install": false},
        "operator": {"gateway": {"role": gateway_role}},
        "api": {"replicas": 1}
    });
    let out = check_py(&[
        "install",
        &env.kubeconfig.to_string_lossy(),
        &release_ns,
        "charts/tenantry",
        release,
        &values.to_string(),
    ]);
    assert!(out.contains("deployed"), "{out}");

    let deploy = |name: &str| -> Value {
        serde_json::from_str(&kubectl_ok(&[
            "get",
            "deployment",
            name,
            "-n",
            &release_ns,
            "-o",
            "json",
        ]))
        .unwrap()
    };
    let operator_deploy = deploy("tenantry-operator");
    let api_deploy = deploy("tenantry-api");
    let sa = |d: &Value| {
        d["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let op_token = kubectl_ok(&["create", "token", &sa(&operator_deploy), "-n", &release_ns]);
    let api_token = kubectl_ok(&["create", "token", &sa(&api_deploy), "-n", &release_ns]);
    let op_kc = token_kubeconfig(op_token.trim(), dir.path(), "operator");
    let api_kc = token_kubeconfig(api_token.trim(), dir.path(), "api");

    // The operator SA may not do what it was not granted (the token really is restricted).
    let out = Command::new("kubectl")
        .args(["get", "pods", "-n", &release_ns])
        .env("KUBECONFIG", &op_kc)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("forbidden"));

    // The API reads no tenant's credentials: the one Secret it may read is the platform
    // signing key its tenants' token keys are derived from.
    let can_i = |args: &[&str]| -> String {
        let out = Command::new("kubectl")
            .args(["auth", "can-i"])
            .args(args)
            .env("KUBECONFIG", &api_kc)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (args, want) in [
        (vec!["list", "secrets", "--all-namespaces"], "no"),
        (vec!["watch", "secrets", "-n", &tenants_ns.name], "no"),
        (vec!["list", "secrets", "-n", &tenants_ns.name], "no"),
        (
            vec!["get", "secret/charted-db", "-n", &tenants_ns.name],
            "no",
        ),
        (
            vec!["get", "secret/tenantry-gateway", "-n", &release_ns],
            "no",
        ),
        (vec!["list", "secrets", "-n", &release_ns], "no"),
        (
            vec!["get", "secret/tenantry-signing-key", "-n", &release_ns],
            "yes",
        ),
        (
            vec!["list", "tenants.tenantry.dev", "-n", &tenants_ns.name],
            "yes",
        ),
        (
            vec!["list", "tenants.tenantry.dev", "-n", &other_ns.name],
            "yes",
        ),
        (
            vec!["list", "tenants.tenantry.dev", "--all-namespaces"],
            "no",
        ),
    ] {
        assert_eq!(can_i(&args), want, "API ServiceAccount: can-i {args:?}");
    }

    // The operator's rights in the release namespace name their objects.
    let op_can_i = |args: &[&str]| -> String {
        let out = Command::new("kubectl")
            .args(["auth", "can-i"])
            .args(args)
            .env("KUBECONFIG", &op_kc)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (args, want) in [
        (vec!["get", "secret/tenantry-gateway"], "yes"),
        (vec!["patch", "secret/tenantry-signing-key"], "yes"),
        (vec!["get", "secret/someone-elses"], "no"),
        (vec!["list", "secrets"], "no"),
        (vec!["update", "lease/tenantry-operator"], "yes"),
        (vec!["update", "lease/someone-elses"], "no"),
        (vec!["watch", "configmap/tenant-migrations"], "yes"),
        (vec!["get", "configmap/someone-elses"], "no"),
        (vec!["list", "configmaps"], "no"),
        (vec!["patch", "tenantrollouts.tenantry.dev/tenantry"], "yes"),
        (
            vec!["patch", "tenantrollouts.tenantry.dev/someone-elses"],
            "no",
        ),
    ] {
        let mut args = args;
        args.extend(["-n", &release_ns]);
        assert_eq!(
            op_can_i(&args),
            want,
            "operator ServiceAccount: can-i {args:?}"
        );
    }

    // Namespace users manage their own Tenants: the chart's Tenant rules join the built-in
    // view/edit/admin roles by label (the test stack runs no controller-manager, whose
    // aggregation controller would fold them in; the labels are checked, the rules are bound
    // directly).
    for (role, labels) in [
        ("tenantry-tenants-view", &["view", "edit", "admin"][..]),
        ("tenantry-tenants-edit", &["edit", "admin"][..]),
    ] {
        let cr: Value =
            serde_json::from_str(&kubectl_ok(&["get", "clusterrole", role, "-o", "json"])).unwrap();
        for to in labels {
            let label = format!("rbac.authorization.k8s.io/aggregate-to-{to}");
            assert_eq!(cr["metadata"]["labels"][&label], "true", "{role}: {label}");
        }
    }
    for (user, roles) in [
        (
            "jane-edit",
            &["tenantry-tenants-view", "tenantry-tenants-edit"][..],
        ),
        ("joe-view", &["tenantry-tenants-view"][..]),
    ] {
        for role in roles {
            kubectl_ok(&[
                "create",
                "rolebinding",
                &format!("{user}-{role}"),
                &format!("--clusterrole={role}"),
                &format!("--user={user}"),
                "-n",
                &tenants_ns.name,
            ]);
        }
    }
    let as_user = |user: &str, verb: &str, resource: &str| -> String {
        let out = Command::new("kubectl")
            .args([
                "auth",
                "can-i",
                verb,
                resource,
                "-n",
                &tenants_ns.name,
                "--as",
                user,
            ])
            .env("KUBECONFIG", &env.kubeconfig)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (user, verb, resource, want) in [
        ("jane-edit", "create", "tenants.tenantry.dev", "yes"),
        ("jane-edit", "delete", "tenants.tenantry.dev", "yes"),
        ("joe-view", "list", "tenants.tenantry.dev", "yes"),
        ("joe-view", "create", "tenants.tenantry.dev", "no"),
        ("joe-view", "list", "secrets", "no"),
    ] {
        assert_eq!(
            as_user(user, verb, resource),
            want,
            "{user}: can-i {verb} {resource}"
        );
    }

    let op_port = free_port();
    let _operator = run_like_deployment(
        &operator_deploy,
        &op_kc,
        &[("DATABASE_URL", env.database_url.clone())],
        &[("--health-addr", format!("127.0.0.1:{op_port}"))],
        &format!("tenantry-helm-operator-{release_ns}.log"),
    );
    tenants_ns
        .create(tenantry::domain::crd::Tenant::test("charted").with_hosts(&["charted.example.com"]))
        .await;
    other_ns
        .create(
            tenantry::domain::crd::Tenant::test("charted-too")
                .with_hosts(&["charted-too.example.com"]),
        )
        .await;
    assert!(wait_ready(&tenants_ns, "charted").await.is_ready());
    assert!(wait_ready(&other_ns, "charted-too").await.is_ready());
    ready_at(op_port, "operator").await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(tenants_ns.client.clone(), &release_ns);
    let lease = leases
        .get("tenantry-operator")
        .await
        .expect("leader Lease in the release namespace");
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("tenantry-under-test")
    );

    // A new migration in the ConfigMap rolls out under the chart's RBAC, without a restart,
    // reported on the release's TenantRollout.
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(tenants_ns.client.clone(), &release_ns);
    cms.patch(
        "tenant-migrations",
        &kube::api::PatchParams::apply("helm-test"),
        &kube::api::Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "tenant-migrations"},
            "data": {"3_notes.sql": "CREATE TABLE notes (id bigint PRIMARY KEY, body text);"},
        })),
    )
    .await
    .unwrap();
    let rollouts: kube::Api<tenantry::domain::rollout::TenantRollout> =
        kube::Api::namespaced(tenants_ns.client.clone(), &release_ns);
    let rolled = eventually(
        "the TenantRollout at version 3",
        Duration::from_secs(60),
        move || {
            let rollouts = rollouts.clone();
            async move {
                rollouts
                    .get_opt("tenantry")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.status)
                    .filter(|s| s.completed_version == Some(3))
            }
        },
    )
    .await;
    assert_eq!(
        (rolled.tenants.done, rolled.tenants.failed),
        (2, 0),
        "{rolled:?}"
    );
    assert_eq!(
        rolled.source,
        format!("ConfigMap {release_ns}/tenant-migrations + demo set")
    );

    let gateway: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(tenants_ns.client.clone(), &release_ns);
    let gateway_uri = secret_value(&gateway.get("tenantry-gateway").await.unwrap(), "uri");
    let api_port = free_port();
    let _api = run_like_deployment(
        &api_deploy,
        &api_kc,
        &[("DATABASE_URL", gateway_uri)],
        &[
            ("--listen", format!("127.0.0.1:{api_port}")),
            ("--metrics-listen", format!("127.0.0.1:{}", free_port())),
        ],
        &format!("tenantry-helm-api-{release_ns}.log"),
    );
    ready_at(api_port, "API").await;
    for (ns, name) in [(&tenants_ns, "charted"), (&other_ns, "charted-too")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(["token", name, "-n", &ns.name])
            .env("KUBECONFIG", &env.kubeconfig)
            .output()
            .unwrap();
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let host = format!("{name}.example.com");
        let status = eventually(
            "API serves the tenant",
            Duration::from_secs(30),
            move || {
                let (token, host) = (token.clone(), host.clone());
                async move {
                    let out = tokio::process::Command::new("curl")
                        .args([
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "-H",
                            &format!("Host: {host}"),
                            "-H",
                            &format!("Authorization: Bearer {token}"),
                        ])
                        .arg(format!("http://127.0.0.1:{api_port}/v1/tables/projects"))
                        .output()
                        .await
                        .ok()?;
                    let code = String::from_utf8_lossy(&out.stdout).to_string();
                    (code == "200").then_some(code)
                }
            },
        )
        .await;
        assert_eq!(status, "200", "{}/{name}", ns.name);
    }

    delete_tenant(&tenants_ns, "charted").await;
    delete_tenant(&other_ns, "charted-too").await;
    wait_gone(&tenants_ns, "charted").await;
    wait_gone(&other_ns, "charted-too").await;
    for log in [
        format!("tenantry-helm-operator-{release_ns}.log"),
        format!("tenantry-helm-api-{release_ns}.log"),
    ] {
        let text = std::fs::read_to_string(std::env::temp_dir().join(&log)).unwrap();
        assert!(
            !text.contains("forbidden"),
            "{log} shows a missing permission:\n{text}"
        );
    }
}
