//! The `TenantRollout` custom resource: one object per operator that shows the rollout of the
//! tenant migration set over the whole fleet — the set it runs, the target version, tenants
//! done, pending and failed, the canary, a halt and why, a refused set and why. The operator
//! creates it and writes only its status; `kubectl get tenantrollouts` shows the columns and
//! `kubectl wait --for=jsonpath='{.status.completedVersion}'=<v>` waits for a version.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::crd::Condition;

/// The rollout of the tenant migration set over the fleet. Created and kept by the operator;
/// its status is the only part that changes. There is nothing to set in the spec.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tenantry.dev",
    version = "v1alpha1",
    kind = "TenantRollout",
    namespaced,
    shortname = "tro",
    category = "tenantry",
    status = "TenantRolloutStatus",
    doc = "The rollout of the tenant migration set over every Tenant the operator manages: written by the operator, read by humans and pipelines.",
    printcolumn = r#"{"name":"Target", "type":"integer", "jsonPath":".status.targetVersion", "description":"The migration set's latest version"}"#,
    printcolumn = r#"{"name":"Completed", "type":"integer", "jsonPath":".status.completedVersion", "description":"The latest version every provisioned Tenant has reached"}"#,
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase", "description":"Progressing, Complete, Failed, Halted or Waiting"}"#,
    printcolumn = r#"{"name":"Done", "type":"integer", "jsonPath":".status.tenants.done", "description":"Tenants at the target version"}"#,
    printcolumn = r#"{"name":"Pending", "type":"integer", "jsonPath":".status.tenants.pending", "description":"Tenants still to migrate (including those retrying)"}"#,
    printcolumn = r#"{"name":"Failed", "type":"integer", "jsonPath":".status.tenants.failed", "description":"Tenants whose migration failed"}"#,
    printcolumn = r#"{"name":"Source", "type":"string", "jsonPath":".status.source", "description":"Where the migration set comes from", "priority":1}"#,
    printcolumn = r#"{"name":"Message", "type":"string", "jsonPath":".status.message", "description":"What the rollout is doing, or why it stopped", "priority":1}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct TenantRolloutSpec {}

/// Observed state of the rollout, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantRolloutStatus {
    /// Progressing (tenants are being migrated), Waiting (the canary has not finished, or
    /// tenants are retrying), Complete (every provisioned Tenant is at the target version),
    /// Failed (finished, with tenants that failed the set) or Halted (stopped after too many
    /// failures; a new migration set starts a new rollout).
    pub phase: String,
    /// One line on what the rollout is doing, or why it stopped.
    pub message: String,
    /// Where the migration set comes from: `ConfigMap <namespace>/<name>`, `directory <path>`,
    /// with ` + demo set` when the built-in demo set comes first.
    pub source: String,
    /// SHA-256 (first 16 hex digits) over every migration's version, name and checksum: which
    /// set this status is about.
    pub set_digest: String,
    /// The migrations of the set being rolled out, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<RolloutMigration>,
    /// The latest migration version of the set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<i64>,
    /// The latest version every provisioned Tenant has reached (the target once the rollout
    /// is Complete). Wait on it: `kubectl wait --for=jsonpath='{.status.completedVersion}'=3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_version: Option<i64>,
    /// Tenant counts of this rollout.
    #[serde(default)]
    pub tenants: RolloutTenants,
    /// The canary, when the operator runs with one (`--rollout-canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<RolloutCanary>,
    /// Whether the rollout stopped after too many failures (`--rollout-max-failures`).
    #[serde(default)]
    pub halted: bool,
    /// The first tenants that failed or are retrying, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<RolloutFailure>,
    /// When this rollout started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it finished: Complete, Failed or Halted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The last migration set the operator refused (the set above keeps running), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedSet>,
    /// Complete, Halted and SetAccepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One migration of the set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutMigration {
    pub version: i64,
    /// `<version>_<description>.sql` as in the source.
    pub name: String,
    /// SHA-256 of the file (first 16 hex digits).
    pub checksum: String,
}

/// Tenant counts of a rollout. Provisioned Tenants only: a new Tenant gets the whole set while
/// it is provisioned, and a suspended one when it resumes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTenants {
    /// Provisioned, not suspended Tenants.
    pub total: u64,
    /// At the target version.
    pub done: u64,
    /// Still to migrate, including those retrying.
    pub pending: u64,
    /// Of the pending, waiting to retry after a transient failure (a lock held by the tenant's
    /// own transaction, a lost connection).
    pub retrying: u64,
    /// Failed the set (the migration itself failed, or the tenant's history refused it).
    pub failed: u64,
}

/// The canary of a rollout.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutCanary {
    /// Tenants migrated first.
    pub size: u64,
    /// Running, Passed or Failed.
    pub state: String,
}

/// A Tenant that failed the set or is retrying it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutFailure {
    /// `<namespace>/<name>`.
    pub tenant: String,
    /// Whether the operator retries it (with backoff) without a new set.
    pub retrying: bool,
    pub message: String,
}

/// A migration set the operator did not run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefusedSet {
    /// Digest of the refused set (absent when it could not be read at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_digest: Option<String>,
    /// InvalidSet, LintFailed, ChecksumChanged, MigrationRemoved, MigrationOutOfOrder or
    /// SourceMissing.
    pub reason: String,
    pub message: String,
    /// When it was refused (RFC 3339).
    pub at: String,
}

/// Condition types of a TenantRollout.
pub mod condition {
    /// True once every provisioned Tenant is at the target version.
    pub const COMPLETE: &str = "Complete";
    /// True while the rollout is stopped after too many failures.
    pub const HALTED: &str = "Halted";
    /// False while the source's latest set is refused (the previous one keeps running).
    pub const SET_ACCEPTED: &str = "SetAccepted";
}
