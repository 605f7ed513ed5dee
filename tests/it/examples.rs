//! Every manifest under examples/ applies to the real apiserver (server-side dry run, real
//! apply where it makes sense), so none of them rots; the plain-manifest install bundle is the
//! chart's current render.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tenantry::postgres::migrations::MigrationSet;

use crate::common::*;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            // Kustomize directories are applied with -k below.
            if !p.join("kustomization.yaml").exists() {
                yaml_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

fn ensure_namespace(ns: &str) {
    let out = kubectl(&["create", "namespace", ns]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("AlreadyExists"),
        "{err}"
    );
}

#[test]
fn every_example_applies_to_the_apiserver() {
    env();
    let ns = format!("t-examples-{}", random_suffix());
    ensure_namespace(&ns);
    kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        "tests/fixtures/gitops-crds.yaml",
    ]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/applications.argoproj.io",
        "crd/kustomizations.kustomize.toolkit.fluxcd.io",
        "--timeout=60s",
    ]);
    for n in [
        "argocd",
        "flux-system",
        "tenants",
        "tenants-staging",
        "tenantry-system",
    ] {
        ensure_namespace(n);
    }

    let policy_v1 = kubectl_ok(&["api-versions"])
        .lines()
        .any(|l| l == "policy/v1");
    let mut files = Vec::new();
    yaml_files(&repo().join("examples"), &mut files);
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        let rel = f
            .strip_prefix(repo())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // Files that name their own namespace keep it; the rest go to the test namespace.
        let text = std::fs::read_to_string(f).unwrap();
        let own_ns = serde_yaml::Deserializer::from_str(&text).any(|doc| {
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_default();
            v.get("metadata").and_then(|m| m.get("namespace")).is_some()
        });
        // The bundle targets current clusters (policy/v1 PodDisruptionBudgets, Kubernetes
        // 1.21+); on an older test apiserver those documents are left out, nothing else.
        let tmp;
        let mut path = rel.clone();
        if !policy_v1 && text.contains("kind: PodDisruptionBudget") {
            let kept: Vec<&str> = text
                .split("\n---\n")
                .filter(|d| !d.contains("kind: PodDisruptionBudget"))
                .collect();
            tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), kept.join("\n---\n")).unwrap();
            path = tmp.path().to_string_lossy().into_owned();
        }
        let mut args = vec!["apply", "--dry-run=server", "-f", &path];
        if !own_ns {
            args.extend(["-n", &ns]);
        }
        let out = kubectl_ok(&args);
        assert!(out.contains("(server dry run)"), "{rel}: {out}");
    }
    // Real applies where they make sense (no kubelet: the Deployment gets no pods).
    for rel in [
        "examples/migrations-configmap.yaml",
        "examples/app-deployment.yaml",
    ] {
        kubectl_ok(&["apply", "-n", &ns, "-f", rel]);
    }
    for overlay in [
        "examples/gitops/overlays/staging",
        "examples/gitops/overlays/production",
    ] {
        let out = kubectl_ok(&["apply", "--dry-run=server", "-k", overlay]);
        assert!(
            out.contains("tenant.tenantry.dev/acme") && out.contains("tenant.tenantry.dev/globex"),
            "{overlay}: {out}"
        );
    }
    let staging = kubectl_ok(&["kustomize", "examples/gitops/overlays/staging"]);
    assert_eq!(
        staging.matches("deletionPolicy: Delete").count(),
        2,
        "{staging}"
    );
}

#[test]
fn the_example_migration_configmap_is_a_valid_migration_set() {
    let text = std::fs::read_to_string(repo().join("examples/migrations-configmap.yaml")).unwrap();
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_yaml::from_str(&text).unwrap();
    let set = MigrationSet::from_files(cm.data.unwrap()).unwrap();
    assert_eq!(set.latest(), Some(2));
    assert_eq!(tenantry::postgres::lint::lint(&set), []);
}

#[test]
fn the_install_bundle_is_the_current_chart_render() {
    let python = helm_python();
    let out = std::process::Command::new(python)
        .args(["tests/helm/check.py", "render", "charts/tenantry"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read(repo().join("examples/install/tenantry.yaml")).unwrap();
    assert!(
        out.stdout == committed,
        "examples/install/tenantry.yaml is stale: tests/helm/check.py render charts/tenantry > examples/install/tenantry.yaml"
    );
}

/// A JSON value as a Lua table constructor (what Argo CD hands its health scripts as `obj`).
fn lua_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!(
            "{{{}}}",
            a.iter().map(lua_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The Argo CD health check for Tenants, run by a real Lua interpreter on the statuses the
/// operator writes: Progressing until Ready for the current generation, Healthy once Ready,
/// Degraded when provisioning stopped or a change was refused, Suspended while paused or
/// suspended.
#[test]
fn the_argocd_health_check_reads_tenant_statuses() {
    #[derive(Deserialize)]
    struct Cm {
        data: std::collections::BTreeMap<String, String>,
    }
    let cm: Cm = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("examples/gitops/argocd-health.yaml")).unwrap(),
    )
    .unwrap();
    let script = &cm.data["resource.customizations.health.tenantry.dev_Tenant"];
    let cond = |t: &str, s: &str| serde_json::json!({"type": t, "status": s, "reason": "R", "message": format!("{t} {s}")});
    let tenant =
        |generation: i64, observed: i64, phase: &str, conditions: Vec<serde_json::Value>| {
            serde_json::json!({
                "metadata": {"name": "acme", "generation": generation},
                "status": {"phase": phase, "observedGeneration": observed, "conditions": conditions}
            })
        };
    let cases = [
        (
            serde_json::json!({"metadata": {"name": "acme", "generation": 1}}),
            "Progressing",
        ),
        (
            tenant(1, 1, "Provisioning", vec![cond("Ready", "False")]),
            "Progressing",
        ),
        (
            tenant(1, 1, "Ready", vec![cond("Ready", "True")]),
            "Healthy",
        ),
        (
            tenant(2, 1, "Ready", vec![cond("Ready", "True")]),
            "Progressing",
        ),
        (
            tenant(1, 1, "Failed", vec![cond("Ready", "False")]),
            "Degraded",
        ),
        (
            tenant(1, 1, "Conflict", vec![cond("Ready", "False")]),
            "Degraded",
        ),
        (
            tenant(
                2,
                2,
                "Ready",
                vec![cond("Ready", "True"), cond("SpecAccepted", "False")],
            ),
            "Degraded",
        ),
        (
            tenant(
                1,
                1,
                "Suspended",
                vec![cond("Ready", "False"), cond("Suspended", "True")],
            ),
            "Suspended",
        ),
        (
            tenant(
                1,
                1,
                "Ready",
                vec![cond("Ready", "True"), cond("Paused", "True")],
            ),
            "Suspended",
        ),
    ];
    for (obj, want) in cases {
        let program = format!(
            "local obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(hs.status)\n",
            lua_value(&obj)
        );
        let out = std::process::Command::new("lua5.4")
            .args(["-e", &program])
            .output()
            .expect("lua5.4 (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{obj}");
    }
}
