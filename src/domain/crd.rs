//! The `Tenant` custom resource (group `tenantry.dev`, version `v1alpha1`): spec, status and
//! condition types, plus the pure helpers that read them. Doc comments on fields become the
//! `kubectl explain` text, so they are written for platform engineers.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;

use super::{limits, naming, plan, rotation};
use serde::{Deserialize, Serialize};

/// API group of every tenantry resource.
pub const GROUP: &str = "tenantry.dev";
/// Finalizer the operator puts on every Tenant so that deletion waits for database cleanup.
pub const FINALIZER: &str = "tenantry.dev/cleanup";
/// With this annotation set to `"true"` the operator leaves the Tenant alone — no database
/// work, no Secret writes, deletion waits — for manual work on its schema (Crossplane's
/// `paused`). The API keeps serving it as it was.
pub const PAUSED_ANNOTATION: &str = "tenantry.dev/paused";
/// A provisioned tenant whose schema was dropped out of band (its data is gone) is left
/// `SchemaMissing` until this annotation is set to a value not acted on before
/// (`status.recreateSchemaRequest`): then the schema is created again, empty, and migrated.
pub const RECREATE_SCHEMA_ANNOTATION: &str = "tenantry.dev/recreate-schema";

/// Desired state of a Tenant, decided by the platform team. tenantry gives the Tenant a
/// PostgreSQL schema owned by a dedicated role, runs the tenant migrations inside that schema
/// and issues the role's credentials as a Secret in the Tenant's namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "tenantry.dev",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    shortname = "tn",
    category = "tenantry",
    status = "TenantStatus",
    doc = "A Tenant gets its own PostgreSQL schema, owned by its own role, migrated with the tenant migration set, with credentials issued as a Secret.",
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status", "description":"Whether the tenant is fully provisioned"}"#,
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase", "description":"Lifecycle phase"}"#,
    printcolumn = r#"{"name":"Schema", "type":"string", "jsonPath":".status.schema", "description":"PostgreSQL schema of the tenant"}"#,
    printcolumn = r#"{"name":"Server", "type":"string", "jsonPath":".status.server", "description":"PostgreSQL server of the tenant", "priority":1}"#,
    printcolumn = r#"{"name":"Migration", "type":"integer", "jsonPath":".status.migrationVersion", "description":"Latest applied migration version"}"#,
    printcolumn = r#"{"name":"Size", "type":"string", "jsonPath":".status.usage.size", "description":"Storage used by the schema (tables, indexes, TOAST), as last measured"}"#,
    printcolumn = r#"{"name":"Quota", "type":"string", "jsonPath":".spec.limits.storage", "description":"Storage quota (spec.limits.storage)", "priority":1}"#,
    printcolumn = r#"{"name":"Hosts", "type":"string", "jsonPath":".spec.hosts", "description":"Host names routed to this tenant", "priority":1}"#,
    printcolumn = r#"{"name":"Secret", "type":"string", "jsonPath":".status.secretName", "description":"Credentials Secret", "priority":1}"#,
    printcolumn = r#"{"name":"Message", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].message", "description":"Why the tenant is or is not Ready", "priority":1}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name of the tenant, shown by the API. Defaults to metadata.name. At most
    /// 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub display_name: Option<String>,

    /// PostgreSQL schema (and role) name for this tenant. Defaults to `<namespace>_<name>` with
    /// `-` and `.` replaced by `_`. Must be a lowercase identifier (`[a-z_][a-z0-9_]*`) of at
    /// most 63 bytes, neither `pg_*` nor a reserved name (`public`, `information_schema`,
    /// `tenantry`, `postgres`, `tenantry_gateway`, `current_user`, `current_role`,
    /// `session_user`, `user`, `none`). Cannot change once set; a change the apiserver lets
    /// through (before Kubernetes 1.25, or from unset to a different name) is refused by the
    /// operator, and the tenant keeps serving from its schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), pattern(naming::IDENT_PATTERN))]
    #[x_kube(
        validation = Rule::new(naming::reserved_names_rule()).message(naming::RESERVED_MESSAGE),
        validation = Rule::new("self == oldSelf").message(SCHEMA_IMMUTABLE_MESSAGE)
    )]
    pub schema: Option<String>,

    /// Host names (exact match) that the tenantry API routes to this tenant, e.g.
    /// `acme.example.com`: lowercase RFC 1123 names of at most 253 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(max = 253), pattern(plan::DNS_SUBDOMAIN_PATTERN)))]
    pub hosts: Vec<String>,

    /// What happens to the schema, its data and the roles when the Tenant is deleted. `Retain`
    /// (default) keeps schema, data, the app role and the owner role and only revokes the app
    /// role's LOGIN (the second login identity `<schema>_b` of credential rotation is dropped);
    /// `Delete` drops the schema with all its data and every role of the tenant.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Options for the credentials Secret.
    #[serde(default)]
    pub credentials: CredentialsSpec,

    /// How the tenantry API serves this tenant.
    #[serde(default, skip_serializing_if = "ApiSpec::is_default")]
    pub api: ApiSpec,

    /// Limits on the tenant's connections, statement time and storage, enforced by PostgreSQL
    /// for its own logins and by the tenantry API for its requests.
    #[serde(default, skip_serializing_if = "LimitsSpec::is_default")]
    pub limits: LimitsSpec,

    /// Suspends the tenant while `true`: its app login loses LOGIN (new logins with the
    /// Secret's credentials fail) and its open sessions are ended, the tenantry API answers
    /// 423 (problem type `tenant-suspended`) for it, and no migration is applied to it. Schema,
    /// data, roles and the Secret stay as they are. `false` or unset resumes it: LOGIN comes
    /// back and the API serves it again. Status: phase `Suspended`, condition `Suspended`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,

    /// Which PostgreSQL server the tenant is created on: a PostgresServer by name (or
    /// `default`, the operator's own `--database-url`), or the least-loaded of those whose
    /// labels match a selector. Unset: the least-loaded server that is ready and not full.
    /// Read when the tenant is first provisioned (`status.server` then records the choice,
    /// which never changes by itself); changed later, it is reported (condition Placed)
    /// but the tenant is not moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<super::server::PlacementSpec>,
}

/// How the tenantry API serves one tenant.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Data requests this tenant may have in flight at once on the API's shared pool; beyond
    /// it, requests wait briefly and are then refused with 429 and `Retry-After`. Defaults to
    /// the API's `--tenant-max-concurrency` (a quarter of its pool unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrency: Option<u32>,
}

impl ApiSpec {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// Per-tenant limits. Each is optional; unset means the operator's or the API's default.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Concurrent direct connections of the tenant's login role (PostgreSQL `CONNECTION
    /// LIMIT`; a further login fails with SQLSTATE 53300). Overrides the operator's
    /// `--tenant-connection-limit`. `0` allows no direct connection at all: the tenant is then
    /// reachable through the tenantry API only (the API's pool logs in as its own role). The
    /// limit is counted per login role: should a tenant have two login identities at once
    /// (while its credentials are rotated), each may open this many. 0 to 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub connections: Option<i32>,

    /// Longest a single statement of this tenant may run, e.g. `500ms`, `2s`, `1m` or `1m30s`
    /// (units ms, s, m, h; at least 1ms, at most 24h); longer statements are cancelled with
    /// SQLSTATE 57014. Applies to every request the tenantry API runs for the tenant (answered
    /// 504 `statement-timeout`; overrides the API's `--statement-timeout-ms`), and is the
    /// default `statement_timeout` of the tenant's login role for direct connections — a
    /// default that a direct session may itself change, as PostgreSQL lets any session set
    /// its own `statement_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(limits::DURATION_PATTERN))]
    pub statement_timeout: Option<String>,

    /// Storage quota of the tenant's schema (its tables with their indexes and TOAST), as a
    /// quantity: `500Mi`, `2Gi`, `1.5G`, `1048576`. Usage is measured periodically (see
    /// `status.usage`); once it is above the quota, the tenant's login role loses INSERT and
    /// UPDATE on the schema's tables — writes with its credentials fail with SQLSTATE 42501
    /// and the tenantry API refuses POST and PATCH with 403 `quota-exceeded` — while reads and
    /// DELETE keep working. Writes resume once usage falls below 90 % of the quota (delete
    /// rows; VACUUM, run by autovacuum, gives the space back). Condition `QuotaExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(limits::QUANTITY_PATTERN))]
    pub storage: Option<String>,
}

impl LimitsSpec {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// The message of the admission rule that keeps `spec.schema` as it was set (Kubernetes 1.25+).
pub const SCHEMA_IMMUTABLE_MESSAGE: &str =
    "spec.schema cannot change once set: the tenant's data lives in that schema";

/// What to do with tenant data when the Tenant is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the schema, its data and the role; revoke the role's LOGIN.
    #[default]
    Retain,
    /// Drop the schema (with all data) and the role.
    Delete,
}

/// Options for the credentials Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSpec {
    /// Name of the Secret holding the tenant's database credentials, in the Tenant's namespace.
    /// Defaults to `<tenant name>-db`. A lowercase RFC 1123 name of at most 253 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(plan::DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,

    /// Extra keys of the credentials Secret, rendered from its fields whenever the Secret is
    /// written (also after a password change): key → text with `{{ .field }}` placeholders,
    /// where field is one of host, port, dbname, username, password, schema, uri, jdbcUri,
    /// jwtKey; `{{ .field | urlencode }}` percent-encodes the value. Example:
    /// `DATABASE_URL: "{{ .uri }}"`. Keys are Secret keys (`[-._a-zA-Z0-9]+`) other than the
    /// Secret's own; at most 32 keys of at most 4096 bytes each. An unknown placeholder makes
    /// the Tenant Invalid with the key named (an already serving Tenant keeps its last Secret).
    /// In Helm templates write the braces as `{{ "{{ .uri }}" }}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub template: BTreeMap<String, String>,
    /// Rotate the credentials this long after the last rotation (or the first issue), e.g.
    /// `720h`: a duration of hours, minutes and seconds (`720h`, `1h30m`, `90s`). Unset: only
    /// on demand, by setting the annotation `tenantry.dev/rotate` to a new value. A rotation
    /// moves the Secret to the tenant's other login identity with a fresh password; the
    /// previous identity keeps working for `gracePeriod`. Must be longer than `gracePeriod`
    /// (at least 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(rotation::DURATION_PATTERN))]
    pub rotation_period: Option<String>,

    /// How long the previous login identity keeps working after a rotation, before it loses
    /// LOGIN and its sessions are ended, e.g. `10m`. Default `5m`; from `1s` to `720h`.
    /// Workloads that mount the Secret see the new credentials only after the kubelet
    /// refreshes the volume (up to about a minute plus its cache TTL), so keep it at 3m or
    /// more unless every client reads the Secret from the apiserver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(rotation::DURATION_PATTERN))]
    pub grace_period: Option<String>,
}

/// Observed state of a Tenant, written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Lifecycle phase: Pending, Provisioning, Ready, Suspended, Invalid, Conflict, Failed or
    /// Deleting.
    #[serde(default)]
    pub phase: Phase,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// PostgreSQL schema of the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,

    /// The server the tenant lives on (a PostgresServer's name, or `default`): chosen once,
    /// before anything is created, and never changed by the operator on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,

    /// The tenant's app role: it may read and write the tenant's tables and create nothing;
    /// the API switches to it. The Secret logs in as it or as its second login identity
    /// `<schema>_b` (a member of it), as `credentials.identity` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,

    /// PostgreSQL role that owns the schema and everything in it and runs the migrations; it
    /// never logs in and no credential for it is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_role: Option<String>,

    /// Name of the credentials Secret in the Tenant's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// Version of the latest migration applied to the tenant schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_version: Option<i64>,

    /// Storage used by the tenant's schema (tables, materialized views, their indexes and
    /// TOAST), as last measured. The whole fleet is measured by one periodic catalog query
    /// (the operator's `--usage-interval-secs`); a measurement is written when it moved by at
    /// least 1 % (and 8 KiB), crossed the quota or its 90 % mark, and otherwise once every 6
    /// hours (so `measuredAt` is when the value shown was measured, not the last measurement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Not nullable in the schema: older apiservers publish nullable objects without their
    // properties, and `kubectl explain` could not show them.
    #[schemars(with = "UsageStatus")]
    pub usage: Option<UsageStatus>,

    /// Which login identity the credentials Secret holds, since when, and until when the
    /// previous one still works (credential rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsStatus>,

    /// The last `tenantry.dev/recreate-schema` annotation value acted on: the schema, dropped
    /// out of band after it was provisioned, was created again (empty) for it. A schema lost
    /// again is recreated only for a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate_schema_request: Option<String>,

    /// One condition per provisioning step (RoleReady, SchemaReady, MigrationsApplied,
    /// CredentialsReady), Ready, Routable (no other Tenant shares its name or a host), and
    /// SpecAccepted=False while a change to an already provisioned tenant is refused (the
    /// tenant keeps serving as it was), Paused=True while the annotation
    /// `tenantry.dev/paused: "true"` freezes it, Suspended while `spec.suspended` holds (False
    /// once resumed), QuotaExceeded (present when `spec.limits.storage` is or was set):
    /// True while writes are refused because usage is above the quota, and SchemaDrift
    /// (after the first drift scan): True while the schema's tables, columns, constraints or
    /// indexes differ from what its migration version creates, naming them; a report only,
    /// Ready does not depend on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Storage used by a tenant's schema: its tables, materialized views, their indexes and TOAST
/// (not temporary tables, which belong to sessions, nor large objects, which belong to the
/// database). Measured for the whole fleet by one periodic catalog query (`--usage-interval-secs`)
/// and written when it moved by at least 1 %, crossed the quota or its 90 % mark, or once every
/// 6 hours.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// Bytes used.
    pub bytes: i64,
    /// The same, for people, as a binary quantity (`96Ki`, `1.4Mi`, `12Gi`).
    pub size: String,
    /// When these bytes were measured (RFC 3339).
    pub measured_at: String,
}

/// The login identity in the credentials Secret. A tenant has at most two login identities, the
/// app role and `<schema>_b` (a member of the app role, so both have the same rights); each
/// rotation moves the Secret to the other one with a fresh password.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsStatus {
    /// PostgreSQL role the credentials Secret logs in as now (its `username`).
    pub identity: String,

    /// When the Secret got this identity and its password (RFC 3339): the last rotation, or
    /// when the credentials were first issued. `spec.credentials.rotationPeriod` counts from
    /// here.
    pub rotated_at: String,

    /// The identity the Secret held before the last rotation, while it still logs in; absent
    /// once it was retired (NOLOGIN, password removed, sessions ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_identity: Option<String>,

    /// When previousIdentity stops working (RFC 3339): the rotation time plus
    /// `spec.credentials.gracePeriod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<String>,

    /// The last value of the annotation `tenantry.dev/rotate` that was acted on: setting the
    /// annotation to any other value rotates the credentials once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
}

/// Lifecycle phase of a Tenant.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Seen, not yet worked on.
    #[default]
    Pending,
    /// Provisioning is in progress or is being retried after a transient error.
    Provisioning,
    /// Schema, role, migrations and credentials are all in place.
    Ready,
    /// `spec.suspended` is true: the app login cannot log in and the API refuses the tenant;
    /// data and credentials are kept.
    Suspended,
    /// The spec cannot be provisioned as written; fix the spec.
    Invalid,
    /// The schema, role or Secret already exists and belongs to something else.
    Conflict,
    /// A step failed (for example a migration); see the conditions.
    Failed,
    /// The Tenant is being deleted according to its deletionPolicy.
    Deleting,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Provisioning,
        Phase::Ready,
        Phase::Suspended,
        Phase::Invalid,
        Phase::Conflict,
        Phase::Failed,
        Phase::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Provisioning => "Provisioning",
            Phase::Ready => "Ready",
            Phase::Suspended => "Suspended",
            Phase::Invalid => "Invalid",
            Phase::Conflict => "Conflict",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
        }
    }
}

/// A standard Kubernetes condition (the shape of metav1.Condition).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: RoleReady, SchemaReady, MigrationsApplied, CredentialsReady or Ready.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition types, in provisioning order.
pub mod condition {
    pub const ROLE_READY: &str = "RoleReady";
    pub const SCHEMA_READY: &str = "SchemaReady";
    pub const MIGRATIONS_APPLIED: &str = "MigrationsApplied";
    pub const CREDENTIALS_READY: &str = "CredentialsReady";
    pub const READY: &str = "Ready";
    /// Whether the API can route to the tenant: no other Tenant has its name or a host of it.
    pub const ROUTABLE: &str = "Routable";
    /// Present, and False, only while the operator refuses the current spec of a tenant it
    /// already provisioned (a change admission let through): the other conditions still
    /// describe the last accepted spec, which the tenant keeps serving.
    pub const SPEC_ACCEPTED: &str = "SpecAccepted";
    /// Present, and True, only while the Tenant carries the pause annotation
    /// ([`super::PAUSED_ANNOTATION`]): nothing is reconciled, the other conditions stay as
    /// they were.
    pub const PAUSED: &str = "Paused";
    /// True while `spec.suspended` holds; False once the tenant was resumed (absent on
    /// tenants never suspended).
    pub const SUSPENDED: &str = "Suspended";
    /// True while writes are refused because storage usage is above `spec.limits.storage`;
    /// False when within it (absent on tenants that never had a quota).
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// True while the schema differs from the reference of its migration version (tables,
    /// columns, constraints, indexes), naming what differs; False when it matches (absent
    /// until the first drift scan). A report only: it does not touch `Ready`.
    pub const SCHEMA_DRIFT: &str = "SchemaDrift";
    /// True once the tenant has a server (`status.server`); False while no server can take
    /// it (nothing is created meanwhile), or while `spec.placement` no longer matches the
    /// server it is on (it stays there: tenants are not moved).
    pub const PLACED: &str = "Placed";
    pub const STEPS: [&str; 4] = [
        ROLE_READY,
        SCHEMA_READY,
        MIGRATIONS_APPLIED,
        CREDENTIALS_READY,
    ];
}

impl Tenant {
    /// A Tenant with an empty spec, for tests and examples: `Tenant::test("acme")`.
    pub fn test(name: &str) -> Self {
        Tenant::new(name, TenantSpec::default())
    }

    pub fn in_namespace(mut self, ns: &str) -> Self {
        self.metadata.namespace = Some(ns.to_string());
        self
    }

    pub fn with_schema(mut self, schema: &str) -> Self {
        self.spec.schema = Some(schema.to_string());
        self
    }

    pub fn with_hosts(mut self, hosts: &[&str]) -> Self {
        self.spec.hosts = hosts.iter().map(|h| h.to_string()).collect();
        self
    }

    pub fn with_secret_name(mut self, name: &str) -> Self {
        self.spec.credentials.secret_name = Some(name.to_string());
        self
    }

    /// Sets `spec.limits`.
    pub fn with_limits(mut self, limits: LimitsSpec) -> Self {
        self.spec.limits = limits;
        self
    }

    /// Whether the QuotaExceeded condition is True: writes are refused.
    pub fn is_over_quota(&self) -> bool {
        self.condition(condition::QUOTA_EXCEEDED)
            .is_some_and(|c| c.status == "True")
    }

    /// Sets `spec.credentials.rotationPeriod` and `gracePeriod`.
    pub fn with_rotation(mut self, period: Option<&str>, grace: Option<&str>) -> Self {
        self.spec.credentials.rotation_period = period.map(str::to_string);
        self.spec.credentials.grace_period = grace.map(str::to_string);
        self
    }

    /// The value of the on-demand rotation annotation ([`rotation::ROTATE_ANNOTATION`]).
    pub fn rotate_request(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(rotation::ROTATE_ANNOTATION))
            .map(String::as_str)
    }

    /// The value of the schema recreation annotation ([`RECREATE_SCHEMA_ANNOTATION`]).
    pub fn recreate_schema_request(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RECREATE_SCHEMA_ANNOTATION))
            .map(String::as_str)
    }

    /// Sets `spec.suspended`.
    pub fn suspended(mut self, suspended: bool) -> Self {
        self.spec.suspended = suspended;
        self
    }

    /// Sets `deletionPolicy: Delete`.
    pub fn deleting(mut self) -> Self {
        self.spec.deletion_policy = DeletionPolicy::Delete;
        self
    }

    /// Name of the credentials Secret: `spec.credentials.secretName` or `<name>-db`.
    pub fn secret_name(&self) -> String {
        self.spec
            .credentials
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-db", self.metadata.name.as_deref().unwrap_or("")))
    }

    /// The named condition from status, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    }

    /// Whether the pause annotation is set to `"true"`.
    pub fn is_paused(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PAUSED_ANNOTATION))
            .is_some_and(|v| v == "true")
    }

    /// Whether `spec.suspended` is true.
    pub fn is_suspended(&self) -> bool {
        self.spec.suspended
    }

    /// True when the Ready condition is True for the current generation.
    pub fn is_ready(&self) -> bool {
        self.condition(condition::READY)
            .is_some_and(|c| c.status == "True")
            && self.status.as_ref().and_then(|s| s.observed_generation) == self.metadata.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn secret_name_defaults_to_name_db() {
        assert_eq!(Tenant::test("acme").secret_name(), "acme-db");
        assert_eq!(
            Tenant::test("acme").with_secret_name("x").secret_name(),
            "x"
        );
    }

    #[test]
    fn crd_has_no_nullable_enums() {
        // kube-apiservers up to 1.24 reject `enum: [.., null]`, which schemars emits for
        // Option<Enum>.
        let yaml = serde_yaml::to_string(&Tenant::crd()).unwrap();
        assert!(!yaml.contains("- null"), "{yaml}");
    }

    /// The schema of `spec.<path>` in the generated CRD.
    fn spec_property(path: &[&str]) -> serde_json::Value {
        let crd = serde_json::to_value(Tenant::crd()).unwrap();
        let mut v = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for p in path {
            v = &v["properties"][p];
        }
        v.clone()
    }

    #[test]
    fn admission_refuses_what_the_operator_would() {
        let schema = spec_property(&["schema"]);
        assert_eq!(schema["maxLength"], 63);
        assert_eq!(schema["pattern"], "^[a-z_][a-z0-9_]*$");
        // Kubernetes 1.25+ evaluates these; older apiservers ignore them and the operator
        // refuses the change instead.
        assert_eq!(
            schema["x-kubernetes-validations"],
            serde_json::json!([
                {
                    "rule": "!(self in ['public', 'information_schema', 'tenantry', 'postgres', \
                             'tenantry_gateway', 'current_user', 'current_role', 'session_user', \
                             'user', 'none']) && !self.startsWith('pg_')",
                    "message": "spec.schema must not be a reserved name or start with pg_"
                },
                {
                    "rule": "self == oldSelf",
                    "message": "spec.schema cannot change once set: the tenant's data lives in that schema"
                }
            ])
        );
        let hosts = spec_property(&["hosts"]);
        assert_eq!(hosts["items"]["maxLength"], 253);
        assert_eq!(hosts["items"]["pattern"], plan::DNS_SUBDOMAIN_PATTERN);
        let secret = spec_property(&["credentials", "secretName"]);
        assert_eq!(secret["pattern"], plan::DNS_SUBDOMAIN_PATTERN);
        assert_eq!(spec_property(&["displayName"])["maxLength"], 200);
    }

    #[test]
    fn the_reserved_names_rule_covers_every_reserved_name() {
        for name in ["public", "tenantry", "tenantry_gateway", "none", "user"] {
            assert!(crate::domain::naming::Ident::parse("schema", name).is_err());
            assert!(
                naming::reserved_names_rule().contains(&format!("'{name}'")),
                "{name}"
            );
        }
    }

    #[test]
    fn suspended_is_an_optional_documented_boolean() {
        let field = spec_property(&["suspended"]);
        assert_eq!(field["type"], "boolean");
        assert!(field["description"]
            .as_str()
            .is_some_and(|d| d.contains("423") && d.contains("LOGIN")));
        let t: TenantSpec = serde_json::from_str(r#"{"suspended": true}"#).unwrap();
        assert!(t.suspended);
        // Unset stays unset when written back (GitOps diffs stay quiet).
        let json = serde_json::to_value(TenantSpec::default()).unwrap();
        assert!(json.get("suspended").is_none());
    }

    #[test]
    fn limits_are_optional_validated_and_documented() {
        let connections = spec_property(&["limits", "connections"]);
        assert_eq!(
            (
                connections["minimum"].as_f64(),
                connections["maximum"].as_f64()
            ),
            (Some(0.0), Some(10000.0))
        );
        let timeout = spec_property(&["limits", "statementTimeout"]);
        assert_eq!(timeout["pattern"], limits::DURATION_PATTERN);
        let storage = spec_property(&["limits", "storage"]);
        assert_eq!(storage["pattern"], limits::QUANTITY_PATTERN);
        for field in [connections, timeout, storage] {
            assert!(
                field["description"].as_str().is_some_and(|d| d.len() > 80),
                "{field}"
            );
        }
        let json = serde_json::to_value(TenantSpec::default()).unwrap();
        assert!(json.get("limits").is_none());
        let crd = serde_json::to_value(Tenant::crd()).unwrap();
        let usage = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"]["usage"];
        assert!(usage.get("nullable").is_none(), "{usage}");
        assert!(usage["description"].as_str().unwrap().contains("1 %"));
        for field in ["bytes", "size", "measuredAt"] {
            assert!(
                usage["properties"][field]["description"].is_string(),
                "{field}"
            );
        }
        let t: TenantSpec = serde_json::from_str(
            r#"{"limits": {"connections": 2, "statementTimeout": "2s", "storage": "1Mi"}}"#,
        )
        .unwrap();
        assert_eq!(t.limits.connections, Some(2));
        assert_eq!(t.limits.statement_timeout.as_deref(), Some("2s"));
    }

    #[test]
    fn rotation_fields_are_validated_and_documented() {
        for field in ["rotationPeriod", "gracePeriod"] {
            let f = spec_property(&["credentials", field]);
            assert_eq!(f["pattern"], rotation::DURATION_PATTERN, "{field}");
            assert_eq!(f["maxLength"], 32, "{field}");
            assert!(f["description"]
                .as_str()
                .is_some_and(|d| d.contains("720h") || d.contains("5m")));
        }
        let crd = serde_json::to_value(Tenant::crd()).unwrap();
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"]["credentials"];
        for field in [
            "identity",
            "rotatedAt",
            "previousIdentity",
            "previousValidUntil",
            "rotateRequest",
        ] {
            assert!(
                status["properties"][field]["description"].is_string(),
                "status.credentials.{field} undocumented"
            );
        }
        // Unset stays unset when written back.
        let json = serde_json::to_value(CredentialsSpec::default()).unwrap();
        assert_eq!(json, serde_json::json!({}));
    }

    #[test]
    fn spec_round_trips_with_defaults() {
        let t: TenantSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(t.deletion_policy, DeletionPolicy::Retain);
        assert!(t.hosts.is_empty());
    }
}
