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
