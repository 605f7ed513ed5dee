//! The `PostgresServer` custom resource (cluster-scoped): a PostgreSQL server tenants may be
//! placed on, and the placement rule that picks one for a new Tenant. The operator's own
//! admin URL (`--database-url`) is the default server, registered under
//! [`DEFAULT_SERVER`] unless renamed: installs without any `PostgresServer` keep every tenant
//! there. Pure: nothing here connects anywhere.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::crd::Condition;

/// Name of the server behind the operator's `--database-url`.
pub const DEFAULT_SERVER: &str = "default";
/// Key of the admin Secret holding the connection URL, unless `adminSecretRef.key` says
/// otherwise.
pub const DEFAULT_SECRET_KEY: &str = "uri";
/// RFC 1123 label: what a PostgresServer name (and so `status.server`) may be.
pub const SERVER_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A PostgreSQL server tenants can be placed on: how the operator reaches it as its admin
/// (a Secret holding a connection URL), what host tenants are given, its labels
/// (`metadata.labels`, matched by a Tenant's `spec.placement.selector`) and how many tenants
/// it takes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tenantry.dev",
    version = "v1alpha1",
    kind = "PostgresServer",
    shortname = "pgs",
    category = "tenantry",
    status = "PostgresServerStatus",
    doc = "A PostgreSQL server tenants can be placed on.",
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status", "description":"Whether the operator reaches the server as its admin"}"#,
    printcolumn = r#"{"name":"Tenants", "type":"integer", "jsonPath":".status.tenants", "description":"Tenants placed on the server"}"#,
    printcolumn = r#"{"name":"Capacity", "type":"integer", "jsonPath":".spec.capacity", "description":"Most tenants the server takes"}"#,
    printcolumn = r#"{"name":"Version", "type":"string", "jsonPath":".status.version", "description":"PostgreSQL server version"}"#,
    printcolumn = r#"{"name":"Used", "type":"string", "jsonPath":".status.size", "description":"Size of the database, as last measured", "priority":1}"#,
    printcolumn = r#"{"name":"Message", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].message", "priority":1}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresServerSpec {
    /// The Secret (in the operator's namespace) holding the operator's admin connection URL
    /// for this server
    /// (`postgresql://user:password@host:port/dbname?sslmode=...`), with the same privileges
    /// as the operator's `--database-url`: CREATEROLE (a superuser is not needed).
    pub admin_secret_ref: SecretKeyRef,

    /// Host name tenants' credentials (and the tenantry API) connect to. Defaults to the
    /// admin URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,

    /// Port tenants' credentials (and the tenantry API) connect to. Defaults to the admin
    /// URL's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,

    /// Most tenants placed on this server; a full server is skipped when placing new tenants
    /// (tenants placed already stay). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub capacity: Option<u32>,

    /// The engine: `postgres` (plain PostgreSQL 15 or later, a managed instance or a
    /// CloudNativePG cluster).
    #[serde(default)]
    pub kind: ServerKind,
}

/// Where a Secret's key is: a Secret in the operator's own namespace (where namespace users,
/// who could otherwise swap a server's admin URL, have no say).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the operator's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the connection URL. Default `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The engine of a server.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    #[default]
    Postgres,
}

/// What the operator last found on the server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresServerStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Whether the operator's last attempt to reach the server as its admin succeeded.
    #[serde(default)]
    pub reachable: bool,
    /// `server_version` of the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where tenants (and the tenantry API) connect: host, port and database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<ServerEndpoint>,
    /// Tenants placed on the server (`status.server` of the Tenants the operator watches).
    #[serde(default)]
    pub tenants: u32,
    /// Size of the server's database in bytes (`pg_database_size`), as last measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_used: Option<i64>,
    /// `bytesUsed` for people (e.g. `1.2 GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// When the server was last looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    /// Ready: True while the operator reaches the server as its admin (and it takes tenants),
    /// False with the reason otherwise (`SecretNotFound`, `InvalidSecret`, `Unreachable`,
    /// `ReservedName`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Where tenants connect on a server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerEndpoint {
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

/// Where a Tenant may be placed. Both unset: on the least-loaded server that is ready and
/// not full.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// The server (a PostgresServer's name, or `default` for the operator's own) to place the
    /// tenant on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), pattern(SERVER_NAME_PATTERN))]
    pub server: Option<String>,
    /// Place the tenant on the least-loaded of the servers whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

impl PlacementSpec {
    pub fn is_default(&self) -> bool {
        self.server.is_none() && self.selector.is_none()
    }
}

const OPERATOR_PATTERN: &str = "^(In|NotIn|Exists|DoesNotExist)$";

/// A label selector, as Kubernetes writes them: every `matchLabels` pair and every
/// `matchExpressions` requirement must hold; empty, it selects every server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One requirement of a [`LabelSelector`].
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[schemars(pattern(OPERATOR_PATTERN))]
    pub operator: String,
    /// The values of `In` and `NotIn` (at least one); none for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// A server as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Option<u32>,
    /// Reachable and taking tenants.
    pub ready: bool,
    /// Tenants placed on it (and placements under way).
    pub tenants: u32,
}

/// Why no server could be picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoServer {
    #[error("spec.placement.server {0:?} names no PostgresServer (nor the default server)")]
    Unknown(String),
    #[error("spec.placement.selector is invalid: {0}")]
    BadSelector(String),
    #[error("no server is eligible: {0}")]
    NoneEligible(String),
}

impl NoServer {
    pub fn reason(&self) -> &'static str {
        match self {
            NoServer::Unknown(_) => "ServerNotFound",
            NoServer::BadSelector(_) => "InvalidPlacement",
            NoServer::NoneEligible(_) => "NoEligibleServer",
        }
    }
}

/// Whether `labels` match `selector` (Kubernetes semantics: every `matchLabels` pair and every
/// `matchExpressions` requirement; an empty selector matches everything).
pub fn matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" if !values.is_empty() => have.is_some_and(|v| values.contains(v)),
            "NotIn" if !values.is_empty() => !have.is_some_and(|v| values.contains(v)),
            "Exists" if values.is_empty() => have.is_some(),
            "DoesNotExist" if values.is_empty() => have.is_none(),
            "In" | "NotIn" => return Err(format!("{} needs values", e.operator)),
            "Exists" | "DoesNotExist" => return Err(format!("{} takes no values", e.operator)),
            other => {
                return Err(format!(
                    "unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                ))
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The server a new tenant goes to: the one `placement` names, or the least-loaded of the
/// ready, not full servers it allows (ties to the first name). A named server must be
/// ready and not full too: nothing is created on a server that cannot take the tenant.
pub fn pick(placement: &PlacementSpec, servers: &[Candidate]) -> Result<String, NoServer> {
    let mut allowed: Vec<&Candidate> = Vec::new();
    for s in servers {
        let by_name = placement.server.as_ref().is_none_or(|n| *n == s.name);
        let by_labels = match &placement.selector {
            Some(sel) => matches(sel, &s.labels).map_err(NoServer::BadSelector)?,
            None => true,
        };
        if by_name && by_labels {
            allowed.push(s);
        }
    }
    if let Some(name) = &placement.server {
        if allowed.is_empty() && !servers.iter().any(|s| s.name == *name) {
            return Err(NoServer::Unknown(name.clone()));
        }
    }
    if allowed.is_empty() {
        return Err(NoServer::NoneEligible(
            "no server matches spec.placement".into(),
        ));
    }
    let full = |s: &Candidate| s.capacity.is_some_and(|c| s.tenants >= c);
    allowed
        .iter()
        .filter(|s| s.ready && !full(s))
        .min_by(|a, b| a.tenants.cmp(&b.tenants).then_with(|| a.name.cmp(&b.name)))
        .map(|s| s.name.clone())
        .ok_or_else(|| {
            let why: Vec<String> = allowed
                .iter()
                .map(|s| {
                    if !s.ready {
                        format!("{} is not ready", s.name)
                    } else {
                        format!(
                            "{} is full ({} of {})",
                            s.name,
                            s.tenants,
                            s.capacity.unwrap_or(0)
                        )
                    }
                })
                .collect();
            NoServer::NoneEligible(why.join(", "))
        })
}

/// Whether a tenant on server `name` (with `labels`) still satisfies `placement` (a changed
/// placement asks for a move).
pub fn satisfies(placement: &PlacementSpec, name: &str, labels: &BTreeMap<String, String>) -> bool {
    placement.server.as_ref().is_none_or(|n| n == name)
        && placement
            .selector
            .as_ref()
            .is_none_or(|sel| matches(sel, labels).unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, labels: &[(&str, &str)], capacity: Option<u32>) -> Candidate {
        Candidate {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity,
            ready: true,
            tenants: 0,
        }
    }

    #[test]
    fn three_hundred_tenants_spread_evenly_over_three_servers() {
        let mut servers = vec![
            server("default", &[], None),
            server("db2", &[], None),
            server("db3", &[], None),
        ];
        // One server already carries some tenants: the others catch up first.
        servers[0].tenants = 20;
        for _ in 0..280 {
            let name = pick(&PlacementSpec::default(), &servers).unwrap();
            servers.iter_mut().find(|s| s.name == name).unwrap().tenants += 1;
        }
        let counts: Vec<u32> = servers.iter().map(|s| s.tenants).collect();
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn full_and_unready_servers_are_skipped_and_named_when_none_is_left() {
        let mut servers = vec![server("a", &[], Some(2)), server("b", &[], None)];
        servers[1].ready = false;
        assert_eq!(pick(&PlacementSpec::default(), &servers).unwrap(), "a");
        servers[0].tenants = 2;
        let err = pick(&PlacementSpec::default(), &servers).unwrap_err();
        assert_eq!(err.reason(), "NoEligibleServer");
        assert_eq!(
            err.to_string(),
            "no server is eligible: a is full (2 of 2), b is not ready"
        );
        // Capacity 0 takes nothing.
        let zero = [server("z", &[], Some(0))];
        assert!(pick(&PlacementSpec::default(), &zero).is_err());
    }

    #[test]
    fn a_placement_names_a_server_or_selects_by_labels() {
        let servers = [
            server("default", &[], None),
            server("eu-1", &[("region", "eu"), ("tier", "shared")], None),
            server("eu-2", &[("region", "eu"), ("tier", "dedicated")], None),
        ];
        let named = PlacementSpec {
            server: Some("eu-2".into()),
            selector: None,
        };
        assert_eq!(pick(&named, &servers).unwrap(), "eu-2");
        let unknown = PlacementSpec {
            server: Some("nope".into()),
            selector: None,
        };
        assert_eq!(
            pick(&unknown, &servers).unwrap_err().reason(),
            "ServerNotFound"
        );
        let eu_shared = PlacementSpec {
            server: None,
            selector: Some(LabelSelector {
                match_labels: Some([("region".to_string(), "eu".to_string())].into()),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["dedicated".into()]),
                }]),
            }),
        };
        assert_eq!(pick(&eu_shared, &servers).unwrap(), "eu-1");
        let fits = |s: &Candidate| satisfies(&eu_shared, &s.name, &s.labels);
        assert!(fits(&servers[1]) && !fits(&servers[2]));
        let none = PlacementSpec {
            server: None,
            selector: Some(LabelSelector {
                match_labels: Some([("region".to_string(), "us".to_string())].into()),
                match_expressions: None,
            }),
        };
        assert_eq!(
            pick(&none, &servers).unwrap_err().reason(),
            "NoEligibleServer"
        );
        let bad = PlacementSpec {
            server: None,
            selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "Near".into(),
                    values: None,
                }]),
            }),
        };
        assert_eq!(
            pick(&bad, &servers).unwrap_err().reason(),
            "InvalidPlacement"
        );
    }
}
