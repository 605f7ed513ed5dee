//! What the operator knows about a tenant's footprint in PostgreSQL, as plain data: the
//! ownership mark written into `COMMENT ON`, the observed role and schema, who holds a name, and
//! where applications reach the database. Reading and writing it is `postgres`' job.

use serde::{Deserialize, Serialize};

/// Identity of the Tenant that a schema or role belongs to, stored as JSON in `COMMENT ON`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "managedBy")]
    pub managed_by: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    pub fn new(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            managed_by: "tenantry".into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// Parses a comment written by [`Owner::comment`]; anything else is not a tenantry mark.
    pub fn parse(comment: Option<&str>) -> Option<Self> {
        serde_json::from_str::<Self>(comment?)
            .ok()
            .filter(|o| o.managed_by == "tenantry")
    }

    pub fn comment(&self) -> String {
        serde_json::to_string(self).expect("plain strings serialize")
    }

    /// Same Tenant by namespace and name. A Tenant deleted with `Retain` and created again
    /// under the same name adopts its data (the uid is then refreshed).
    pub fn same_tenant(&self, other: &Owner) -> bool {
        self.namespace == other.namespace && self.name == other.name
    }
}

/// What exists in PostgreSQL for one tenant identifier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The app role: logs in with the credentials, uses the data.
    pub role: Option<RoleState>,
    /// The owner role: owns the schema and its objects, never logs in.
    pub owner_role: Option<RoleState>,
    /// The second login identity (`<schema>_b`), which credential rotation alternates with
    /// the app role.
    pub login_b: Option<RoleState>,
    pub schema: Option<SchemaState>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoleState {
    pub can_login: bool,
    /// Whether the API gateway role is a member (may `SET ROLE` to it).
    pub gateway_member: bool,
    pub owner: Option<Owner>,
    /// The stored SCRAM verifier, when the admin role may read `pg_authid`.
    pub verifier: Option<String>,
    /// `rolconnlimit`: concurrent sessions allowed (-1: unlimited).
    pub connection_limit: i32,
    /// The role's own default `statement_timeout` (`ALTER ROLE … SET`, in every database), as
    /// PostgreSQL stores it, if any.
    pub statement_timeout: Option<String>,
    /// Whether it is a member of the app role (the second login identity must be: it inherits
    /// the app role's rights that way).
    pub member_of_app: bool,
}

/// What the operator wants of every login role of a tenant (the app role and, once a rotation
/// made it, the second login identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginSettings {
    /// `CONNECTION LIMIT` (-1: unlimited).
    pub connection_limit: i32,
    /// Default `statement_timeout` in milliseconds; `None` leaves the server's default.
    pub statement_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchemaState {
    pub owner_role: String,
    pub owner: Option<Owner>,
    /// The app role may create objects in the schema (it owns it, or was granted CREATE).
    pub app_can_create: bool,
    /// The app role may use the schema.
    pub app_usage: bool,
}

/// How a tenant's schema stands against the owner/app layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Missing,
    /// Owned by the app role: provisioned before the owner/app split; must be converted.
    Legacy,
    /// Owned by someone else than the owner role, or the app role's rights drifted.
    Drifted,
    Current,
}

/// Who holds a name that a Tenant wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Nobody,
    ThisTenant,
    /// Exists without a tenantry mark (created by hand or by another tool).
    Unmanaged,
    OtherTenant(Owner),
}

fn holder(exists: bool, mark: Option<&Owner>, me: &Owner) -> Holder {
    match (exists, mark) {
        (false, _) => Holder::Nobody,
        (true, None) => Holder::Unmanaged,
        (true, Some(o)) if o.same_tenant(me) => Holder::ThisTenant,
        (true, Some(o)) => Holder::OtherTenant(o.clone()),
    }
}

impl Observed {
    pub fn role_holder(&self, me: &Owner) -> Holder {
        holder(
            self.role.is_some(),
            self.role.as_ref().and_then(|r| r.owner.as_ref()),
            me,
        )
    }

    pub fn owner_role_holder(&self, me: &Owner) -> Holder {
        holder(
            self.owner_role.is_some(),
            self.owner_role.as_ref().and_then(|r| r.owner.as_ref()),
            me,
        )
    }

    pub fn login_b_holder(&self, me: &Owner) -> Holder {
        holder(
            self.login_b.is_some(),
            self.login_b.as_ref().and_then(|r| r.owner.as_ref()),
            me,
        )
    }

    /// Where the schema stands, for an owner role named `owner_role` and an app role `app`.
    pub fn layout(&self, owner_role: &str, app: &str) -> Layout {
        match &self.schema {
            None => Layout::Missing,
            Some(s) if s.owner_role == app => Layout::Legacy,
            Some(s) if s.owner_role != owner_role || s.app_can_create || !s.app_usage => {
                Layout::Drifted
            }
            Some(_) => Layout::Current,
        }
    }

    pub fn schema_holder(&self, me: &Owner) -> Holder {
        holder(
            self.schema.is_some(),
            self.schema.as_ref().and_then(|s| s.owner.as_ref()),
            me,
        )
    }
}

/// Where applications reach the database: written into every credentials Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    /// libpq's TLS parameters for applications (`sslmode`, `sslrootcert`, …; see
    /// [`TLS_PARAMS`]), in that order: from the admin URL, then `--tenant-db-tls-param` and
    /// `--tenant-db-sslmode`. Put into the URIs; empty leaves the client's defaults.
    pub tls: Vec<(String, String)>,
}

/// The `sslmode` libpq and pgjdbc both understand.
pub const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The libpq connection parameters about TLS that credentials carry, in the order they are
/// written, with the name pgjdbc knows each by (`None`: pgjdbc has no such parameter, and the
/// `jdbc-uri` leaves it out).
pub const TLS_PARAMS: [(&str, Option<&str>); 7] = [
    ("sslmode", Some("sslmode")),
    ("sslnegotiation", Some("sslNegotiation")),
    ("sslrootcert", Some("sslrootcert")),
    ("sslcert", Some("sslcert")),
    ("sslkey", Some("sslkey")),
    ("sslcrl", None),
    ("sslsni", None),
];

/// Why a TLS parameter cannot go into credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsParamError {
    #[error("unknown TLS parameter {0:?}; known: sslmode, sslnegotiation, sslrootcert, sslcert, sslkey, sslcrl, sslsni")]
    Unknown(String),
    #[error("{name}={value:?} is not valid; expected one of {expected}")]
    Value {
        name: String,
        value: String,
        expected: String,
    },
    #[error("{0} must not contain control characters")]
    Control(String),
}

/// Checks one TLS parameter: a known name, and for the enumerated ones a value libpq accepts.
/// An empty value is valid (it removes an inherited parameter).
pub fn check_tls_param(name: &str, value: &str) -> Result<(), TlsParamError> {
    if !TLS_PARAMS.iter().any(|(n, _)| *n == name) {
        return Err(TlsParamError::Unknown(name.into()));
    }
    let allowed: &[&str] = match name {
        "sslmode" => &SSL_MODES,
        "sslnegotiation" => &["postgres", "direct"],
        "sslsni" => &["0", "1"],
        _ => &[],
    };
    if !value.is_empty() && !allowed.is_empty() && !allowed.contains(&value) {
        return Err(TlsParamError::Value {
            name: name.into(),
            value: value.into(),
            expected: allowed.join(", "),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(TlsParamError::Control(name.into()));
    }
    Ok(())
}

impl Endpoint {
    /// The value of TLS parameter `name`, if set.
    pub fn tls_param(&self, name: &str) -> Option<&str> {
        self.tls
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets TLS parameter `name` (checked with [`check_tls_param`]); an empty value removes it.
    /// Keeps [`TLS_PARAMS`] order.
    pub fn set_tls_param(&mut self, name: &str, value: &str) -> Result<(), TlsParamError> {
        check_tls_param(name, value)?;
        self.tls.retain(|(n, _)| n != name);
        if !value.is_empty() {
            self.tls.push((name.into(), value.into()));
        }
        let rank = |n: &str| TLS_PARAMS.iter().position(|(p, _)| *p == n);
        self.tls.sort_by_key(|(n, _)| rank(n));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let schema = |owner: &str, create: bool, usage: bool| Observed {
            schema: Some(SchemaState {
                owner_role: owner.into(),
                owner: None,
                app_can_create: create,
                app_usage: usage,
            }),
            ..Observed::default()
        };
        assert_eq!(Observed::default().layout("o", "a"), Layout::Missing);
        assert_eq!(schema("a", true, true).layout("o", "a"), Layout::Legacy);
        assert_eq!(schema("o", false, true).layout("o", "a"), Layout::Current);
        assert_eq!(schema("o", true, true).layout("o", "a"), Layout::Drifted);
        assert_eq!(schema("o", false, false).layout("o", "a"), Layout::Drifted);
        assert_eq!(schema("x", false, true).layout("o", "a"), Layout::Drifted);
    }

    #[test]
    fn owner_mark_round_trip() {
        let o = Owner::new("ns", "acme", "uid-1");
        assert_eq!(Owner::parse(Some(&o.comment())), Some(o.clone()));
        assert_eq!(Owner::parse(Some("hand made")), None);
        assert_eq!(Owner::parse(None), None);
        let adopted = Owner::new("ns", "acme", "uid-2");
        assert!(o.same_tenant(&adopted));
        assert!(!o.same_tenant(&Owner::new("other", "acme", "uid-1")));
    }

    #[test]
    fn holders() {
        let me = Owner::new("ns", "a", "u");
        let other = Owner::new("ns", "b", "u2");
        assert_eq!(holder(false, None, &me), Holder::Nobody);
        assert_eq!(holder(true, None, &me), Holder::Unmanaged);
        assert_eq!(holder(true, Some(&me), &me), Holder::ThisTenant);
        assert_eq!(
            holder(true, Some(&other), &me),
            Holder::OtherTenant(other.clone())
        );
    }
}
