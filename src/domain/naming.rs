//! PostgreSQL identifiers for tenants: how schema and role names are derived from a Tenant,
//! which names are acceptable, and how identifiers and literals are quoted before they reach SQL.
//! Nothing here talks to a database; everything is pure and unit-tested.

use std::fmt;

/// PostgreSQL truncates identifiers longer than this many bytes (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The schema the operator reserves for itself; no tenant may take it.
pub const OPERATOR_SCHEMA: &str = "tenantry";

/// Names no tenant schema or role may take, whatever its source.
const RESERVED: &[&str] = &[
    "public",
    "information_schema",
    OPERATOR_SCHEMA,
    "postgres",
    "tenantry_gateway",
    "current_user",
    "current_role",
    "session_user",
    "user",
    "none",
];

/// The syntax of a tenant identifier, as the CRD's `pattern` (the length is its `maxLength`).
pub const IDENT_PATTERN: &str = "^[a-z_][a-z0-9_]*$";

/// What the CRD's reserved-name rule says when it refuses a schema name.
pub const RESERVED_MESSAGE: &str = "spec.schema must not be a reserved name or start with pg_";

/// The reserved names as a CEL rule on a string (`self`), for the CRD: the apiserver refuses
/// them at admission (Kubernetes 1.25+); [`Ident::parse`] refuses them everywhere.
pub fn reserved_names_rule() -> String {
    let names = RESERVED
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("!(self in [{names}]) && !self.startsWith('pg_')")
}

/// Why a name cannot be used as a tenant identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} {name:?} is {len} bytes long; PostgreSQL identifiers are at most 63 bytes")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error("{what} {name:?} must start with a lowercase letter or underscore and contain only lowercase letters, digits and underscores")]
    Invalid { what: &'static str, name: String },
    #[error("{what} {name:?} is reserved")]
    Reserved { what: &'static str, name: String },
}

/// A validated PostgreSQL identifier: lowercase ASCII letters, digits and `_`, starting with a
/// letter or `_`, at most 63 bytes, not reserved. Its `Display` is the quoted form, so it can
/// only reach SQL quoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validates `name` as a tenant identifier; `what` names it in errors ("schema", "role").
    pub fn parse(what: &'static str, name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty { what });
        }
        if name.len() > MAX_IDENTIFIER_BYTES {
            return Err(NameError::TooLong {
                what,
                name: name.to_string(),
                len: name.len(),
            });
        }
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok {
            return Err(NameError::Invalid {
                what,
                name: name.to_string(),
            });
        }
        if RESERVED.contains(&name) || name.starts_with("pg_") {
            return Err(NameError::Reserved {
                what,
                name: name.to_string(),
            });
        }
        Ok(Self(name.to_string()))
    }

    /// Validates the syntax of a role name chosen by the operator's administrator (such as the
    /// gateway role); reserved tenant names are allowed, `pg_*` is not.
    pub fn parse_role(name: &str) -> Result<Self, NameError> {
        match Self::parse("role", name) {
            Err(NameError::Reserved { .. }) if !name.starts_with("pg_") && name != "public" => {
                Ok(Self(name.to_string()))
            }
            other => other,
        }
    }

    /// The bare name, for status fields, Secrets and bound parameters (never for SQL text).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&quote_ident(&self.0))
    }
}

/// Prefix of the operator's own scratch tenants (the reference schemas of schema drift
/// detection): `tenantry$`, which no tenant identifier can start with (`$` is outside
/// [`IDENT_PATTERN`], so [`Ident::parse`] refuses it), while PostgreSQL takes it quoted.
pub const SCRATCH_PREFIX: &str = "tenantry$";

/// A scratch identifier of the operator's own, `tenantry$<stem>`: no tenant can take it, nor
/// the roles derived from it ([`owner_role`], [`login_b`]), which contain the `$` too. `stem`
/// must be a valid identifier tail (lowercase letters, digits, `_`), at most 40 bytes.
pub fn scratch_ident(stem: &str) -> Ident {
    assert!(
        stem.len() <= 40
            && !stem.is_empty()
            && stem
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "scratch stem {stem:?}"
    );
    Ident(format!("{SCRATCH_PREFIX}{stem}"))
}

/// Quotes any string as a PostgreSQL identifier (`"a""b"`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string as a PostgreSQL string literal (`'it''s'`), for the few DDL positions that
/// cannot take bound parameters (`COMMENT ON`, `PASSWORD`). Assumes
/// `standard_conforming_strings = on` (the default since PostgreSQL 9.1); backslashes and NUL
/// bytes are refused rather than guessed at.
pub fn quote_literal(value: &str) -> Option<String> {
    if value.contains('\\') || value.contains('\0') {
        return None;
    }
    Some(format!("'{}'", value.replace('\'', "''")))
}

/// The schema name derived from a Tenant's namespace and name: `<namespace>_<name>` with `-`
/// and `.` mapped to `_`. Kubernetes names are lowercase DNS names, so the result only needs
/// length and reserved-word checks.
pub fn default_schema_name(namespace: &str, name: &str) -> String {
    let map = |s: &str| s.replace(['-', '.'], "_");
    format!("{}_{}", map(namespace), map(name))
}

/// Resolves the schema (and role, which shares its name) for a Tenant.
pub fn tenant_ident(
    namespace: &str,
    name: &str,
    schema_override: Option<&str>,
) -> Result<Ident, NameError> {
    match schema_override {
        Some(s) => Ident::parse("schema", s),
        None => Ident::parse("schema", &default_schema_name(namespace, name)),
    }
}

/// Suffix of a tenant's owner role.
pub const OWNER_SUFFIX: &str = "_owner";

/// The tenant's owner role: owns the schema and everything in it, runs the migrations, never
/// logs in. `<schema>_owner`, or — when that would pass PostgreSQL's 63-byte limit — the first
/// 46 bytes of the schema name, 8 hex digits of its SHA-256 and `_owner`, so that every valid
/// schema name has an owner role and distinct schemas get distinct ones.
pub fn owner_role(schema: &Ident) -> Ident {
    let name = schema.as_str();
    if name.len() + OWNER_SUFFIX.len() <= MAX_IDENTIFIER_BYTES {
        return Ident(format!("{name}{OWNER_SUFFIX}"));
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    // Identifiers are ASCII, so any byte offset is a character boundary.
    Ident(format!("{}_{hex}{OWNER_SUFFIX}", &name[..46]))
}

/// Suffix of a tenant's second login identity.
pub const LOGIN_B_SUFFIX: &str = "_b";

/// The tenant's second login identity (credential rotation alternates between the app role
/// and this one): `<schema>_b`, or — when that would pass the 63-byte limit — the first 52
/// bytes of the schema name, 8 hex digits of its SHA-256 and `_b`, like [`owner_role`].
pub fn login_b(schema: &Ident) -> Ident {
    let name = schema.as_str();
    if name.len() + LOGIN_B_SUFFIX.len() <= MAX_IDENTIFIER_BYTES {
        return Ident(format!("{name}{LOGIN_B_SUFFIX}"));
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    Ident(format!("{}_{hex}{LOGIN_B_SUFFIX}", &name[..52]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_identities_fit_and_stay_distinct() {
        let short = Ident::parse("schema", "team_a_acme").unwrap();
        assert_eq!(login_b(&short).as_str(), "team_a_acme_b");
        let a = Ident::parse("schema", &"a".repeat(63)).unwrap();
        let b = Ident::parse("schema", &format!("{}b", "a".repeat(62))).unwrap();
        let (la, lb) = (login_b(&a), login_b(&b));
        assert_eq!(la.as_str().len(), MAX_IDENTIFIER_BYTES, "{la:?}");
        assert!(la.as_str().ends_with("_b"));
        assert_ne!(la, lb);
        assert_ne!(la, owner_role(&a));
        assert!(Ident::parse("role", la.as_str()).is_ok());
        // Exactly at the limit: suffixed as is.
        let edge = Ident::parse("schema", &"c".repeat(61)).unwrap();
        assert_eq!(login_b(&edge).as_str().len(), 63);
    }

    #[test]
    fn owner_roles_fit_and_stay_distinct() {
        let short = Ident::parse("schema", "team_a_acme").unwrap();
        assert_eq!(owner_role(&short).as_str(), "team_a_acme_owner");
        let a = Ident::parse("schema", &"a".repeat(63)).unwrap();
        let b = Ident::parse("schema", &format!("{}b", "a".repeat(62))).unwrap();
        let (oa, ob) = (owner_role(&a), owner_role(&b));
        assert!(oa.as_str().len() <= MAX_IDENTIFIER_BYTES, "{oa:?}");
        assert!(oa.as_str().ends_with("_owner"));
        assert_ne!(oa, ob);
        assert!(Ident::parse("role", oa.as_str()).is_ok());
    }

    #[test]
    fn scratch_names_are_out_of_every_tenants_reach() {
        let s = scratch_ident("ref_0a1b");
        assert_eq!(s.as_str(), "tenantry$ref_0a1b");
        assert_eq!(s.to_string(), "\"tenantry$ref_0a1b\"");
        for derived in [s.as_str(), owner_role(&s).as_str(), login_b(&s).as_str()] {
            assert!(
                matches!(
                    Ident::parse("schema", derived),
                    Err(NameError::Invalid { .. })
                ),
                "{derived} could be a tenant's"
            );
        }
    }

    #[test]
    fn derives_from_namespace_and_name() {
        let id = tenant_ident("team-a", "acme.corp", None).unwrap();
        assert_eq!(id.as_str(), "team_a_acme_corp");
        assert_eq!(id.to_string(), "\"team_a_acme_corp\"");
    }

    #[test]
    fn override_wins() {
        assert_eq!(
            tenant_ident("ns", "x", Some("acme")).unwrap().as_str(),
            "acme"
        );
    }

    #[test]
    fn rejects_reserved_and_system_names() {
        for bad in [
            "public",
            "pg_catalog",
            "pg_toast",
            "information_schema",
            "tenantry",
        ] {
            assert!(
                matches!(Ident::parse("schema", bad), Err(NameError::Reserved { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "Acme",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "a;drop",
            "tenant.x",
            "ünïcode",
            "аcme", /* Cyrillic а */
        ] {
            assert!(
                matches!(Ident::parse("schema", bad), Err(NameError::Invalid { .. })),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            Ident::parse("schema", ""),
            Err(NameError::Empty { .. })
        ));
    }

    #[test]
    fn length_is_measured_in_bytes() {
        let ok = "a".repeat(63);
        assert!(Ident::parse("schema", &ok).is_ok());
        let long = "a".repeat(64);
        assert!(matches!(
            Ident::parse("schema", &long),
            Err(NameError::TooLong { len: 64, .. })
        ));
        let derived = tenant_ident(&"n".repeat(40), &"m".repeat(40), None);
        assert!(matches!(derived, Err(NameError::TooLong { len: 81, .. })));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal("a\\b"), None);
    }
}
