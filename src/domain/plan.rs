//! Validation of a Tenant (pure): everything the controller needs to know before touching the
//! database, or the reason the spec cannot be provisioned as written.

use kube::ResourceExt;

use super::{
    crd::Tenant,
    limits::TenantLimits,
    naming::{tenant_ident, Ident},
    rotation,
    state::Owner,
};

/// What a valid Tenant is provisioned as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Name of both the schema and the role.
    pub ident: Ident,
    pub owner: Owner,
    pub secret_name: String,
    /// `spec.limits`, parsed.
    pub limits: TenantLimits,
    /// When to rotate the credentials and how long the previous identity keeps working.
    pub rotation: rotation::Policy,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// [`is_dns_subdomain`] as the CRD's `pattern` (with `maxLength: 253`; the 63-character label
/// limit is left to the operator).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// RFC 1123 subdomain, the rule for Secret names and host names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Validates `tenant`; the error is the message shown in its Ready condition.
pub fn plan(tenant: &Tenant) -> Result<Plan, String> {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let ident = tenant_ident(&namespace, &name, tenant.spec.schema.as_deref()).map_err(|e| {
        if tenant.spec.schema.is_none() {
            format!("{e}; set spec.schema to a valid name")
        } else {
            format!("spec.schema: {e}")
        }
    })?;
    if let Some(current) = tenant.status.as_ref().and_then(|s| s.schema.as_deref()) {
        if current != ident.as_str() {
            return Err(format!(
                "spec.schema cannot change once provisioned: the tenant lives in schema {current:?}, the spec now asks for {:?}",
                ident.as_str()
            ));
        }
    }
    let secret_name = tenant.secret_name();
    if !is_dns_subdomain(&secret_name) {
        return Err(format!(
            "spec.credentials.secretName {secret_name:?} is not a valid Secret name (lowercase RFC 1123 subdomain)"
        ));
    }
    super::template::validate(&tenant.spec.credentials.template)?;
    if let Some(d) = &tenant.spec.display_name {
        if d.chars().count() > 200 {
            return Err("spec.displayName is longer than 200 characters".into());
        }
    }
    for (i, host) in tenant.spec.hosts.iter().enumerate() {
        if !is_dns_subdomain(host) {
            return Err(format!(
                "spec.hosts[{i}] {host:?} is not a valid lowercase host name"
            ));
        }
        if tenant.spec.hosts[..i].contains(host) {
            return Err(format!("spec.hosts[{i}] {host:?} is listed twice"));
        }
    }
    let limits = TenantLimits::of(&tenant.spec.limits)?;
    let rotation = rotation::policy(tenant)?;
    Ok(Plan {
        limits,
        rotation,
        owner: Owner::new(
            &namespace,
            &name,
            tenant.metadata.uid.as_deref().unwrap_or_default(),
        ),
        ident,
        secret_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::crd::TenantStatus;

    fn t(name: &str) -> Tenant {
        Tenant::test(name).in_namespace("team-a")
    }

    #[test]
    fn valid_tenant_plans() {
        let p = plan(&t("acme").with_hosts(&["acme.example.com"])).unwrap();
        assert_eq!(p.ident.as_str(), "team_a_acme");
        assert_eq!(p.secret_name, "acme-db");
        assert_eq!(p.owner.namespace, "team-a");
    }

    #[test]
    fn invalid_specs_explain_themselves() {
        let e = plan(&t("acme").with_schema("public")).unwrap_err();
        assert!(e.contains("spec.schema") && e.contains("reserved"), "{e}");
        let e = plan(&t("acme").with_schema("pg_x")).unwrap_err();
        assert!(e.contains("reserved"), "{e}");
        let long = "x".repeat(60);
        let e = plan(&t(&long)).unwrap_err();
        assert!(
            e.contains("63 bytes") && e.contains("set spec.schema"),
            "{e}"
        );
        let e = plan(&t("acme").with_hosts(&["Bad Host"])).unwrap_err();
        assert!(e.contains("spec.hosts[0]"), "{e}");
        let e = plan(&t("acme").with_hosts(&["a.io", "a.io"])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = plan(&t("acme").with_secret_name("Bad_Name")).unwrap_err();
        assert!(e.contains("secretName"), "{e}");
        let mut bad = t("acme");
        bad.spec
            .credentials
            .template
            .insert("DATABASE_URL".into(), "{{ .url }}".into());
        let e = plan(&bad).unwrap_err();
        assert!(
            e.contains("template[DATABASE_URL]") && e.contains(".url"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_parsed_or_explained() {
        use crate::domain::crd::LimitsSpec;
        let p = plan(&t("acme").with_limits(LimitsSpec {
            connections: Some(0),
            statement_timeout: Some("1m30s".into()),
            storage: Some("2Mi".into()),
        }))
        .unwrap();
        assert_eq!(
            p.limits,
            TenantLimits {
                connections: Some(0),
                statement_timeout_ms: Some(90_000),
                storage_bytes: Some(2 << 20),
            }
        );
        let bad = |l: LimitsSpec| plan(&t("acme").with_limits(l)).unwrap_err();
        let e = bad(LimitsSpec {
            statement_timeout: Some("0s".into()),
            ..LimitsSpec::default()
        });
        assert!(
            e.contains("spec.limits.statementTimeout") && e.contains("zero"),
            "{e}"
        );
        let e = bad(LimitsSpec {
            storage: Some("lots".into()),
            ..LimitsSpec::default()
        });
        assert!(e.contains("spec.limits.storage"), "{e}");
        let e = bad(LimitsSpec {
            connections: Some(-1),
            ..LimitsSpec::default()
        });
        assert!(e.contains("spec.limits.connections"), "{e}");
    }

    #[test]
    fn schema_is_immutable_once_provisioned() {
        let mut tenant = t("acme").with_schema("acme_new");
        tenant.status = Some(TenantStatus {
            schema: Some("acme_old".into()),
            ..TenantStatus::default()
        });
        assert!(plan(&tenant).unwrap_err().contains("cannot change"));
    }
}
