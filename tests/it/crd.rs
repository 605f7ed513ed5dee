//! The committed CRD is what the binary generates, the apiserver accepts it, and kubectl
//! explains it.

use crate::common::*;

#[test]
fn committed_crd_matches_the_generated_one() {
    let committed = std::fs::read_to_string(repo().join("crds/tenant.yaml")).unwrap();
    assert!(
        committed == tenantry::cli::crd_yaml(),
        "crds/tenant.yaml is stale: run `cargo run -- crd > crds/tenant.yaml`"
    );
    let committed = std::fs::read_to_string(repo().join("crds/tenantrollout.yaml")).unwrap();
    assert!(
        committed == tenantry::cli::rollout_crd_yaml(),
        "crds/tenantrollout.yaml is stale: run `cargo run -- crd tenantrollout > crds/tenantrollout.yaml`"
    );
    let committed = std::fs::read_to_string(repo().join("crds/postgresserver.yaml")).unwrap();
    assert!(
        committed == tenantry::cli::server_crd_yaml(),
        "crds/postgresserver.yaml is stale: run `cargo run -- crd postgresserver > crds/postgresserver.yaml`"
    );
}

#[test]
fn kubectl_explain_reads_the_field_docs() {
    env();
    // The apiserver publishes a new CRD's OpenAPI a few seconds after it is established.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !kubectl(&["explain", "tenant.spec"]).status.success()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let out = kubectl_ok(&["explain", "tenant.spec"]);
    for field in [
        "deletionPolicy",
        "hosts",
        "schema",
        "credentials",
        "displayName",
    ] {
        assert!(out.contains(field), "{out}");
    }
    assert!(out.contains("Retain"), "{out}");
    // kubectl wraps descriptions: compare with whitespace collapsed.
    let explain = |path: &str| {
        kubectl_ok(&["explain", path])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out = explain("tenant.spec.deletionPolicy");
    assert!(out.contains("drops the schema with all its data"), "{out}");
    let out = explain("tenant.status");
    assert!(out.contains("Observed state of a Tenant"), "{out}");
    let out = kubectl_ok(&["explain", "tenant.spec.limits"]);
    for text in [
        "connections",
        "statementTimeout",
        "storage",
        "53300",
        "quota-exceeded",
    ] {
        assert!(out.contains(text), "{text} in {out}");
    }
    // (`status` is a nullable object, which apiservers before OpenAPI v3 publish without its
    // properties: its fields' docs are checked in the CRD's unit tests.)
    let out = explain("tenant.spec.credentials");
    assert!(
        out.contains("rotationPeriod") && out.contains("gracePeriod"),
        "{out}"
    );
    let out = explain("tenant.spec.credentials.rotationPeriod");
    assert!(out.contains("tenantry.dev/rotate"), "{out}");
    let out = explain("tenant.spec.credentials.gracePeriod");
    assert!(out.contains("Default `5m`"), "{out}");
    // (The 1.20 test apiserver publishes no fields of nullable objects such as `status` in
    // its OpenAPI v2, so `status.credentials` is checked in the generated CRD instead, by
    // `domain::crd::tests::rotation_fields_are_validated_and_documented`.)
}

#[test]
fn the_crd_with_its_admission_rules_installs_on_the_test_apiserver() {
    env();
    // The stack installed crds/tenant.yaml (x-kubernetes-validations included) with a plain
    // apply; a 1.20 apiserver keeps its patterns and lengths and drops the CEL rules.
    let crd: serde_json::Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "crd",
        "tenants.tenantry.dev",
        "-o",
        "json",
    ]))
    .unwrap();
    let established = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{crd}");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["schema"];
    assert_eq!(schema["pattern"], tenantry::domain::naming::IDENT_PATTERN);
    assert_eq!(schema["maxLength"], 63);
}
