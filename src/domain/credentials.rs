//! The credentials contract: the Secret's keys, labels and name, read by the operator (which
//! writes it), the API registry and the CLI; what a Secret should contain (pure) and whether an
//! existing one can be kept, repaired with its password, or must get a new password.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{api::ObjectMeta, Resource, ResourceExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use rand::{distr::Alphanumeric, Rng};

use super::{
    crd::Tenant,
    naming::Ident,
    scram,
    state::{Endpoint, TLS_PARAMS},
};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "tenantry";
pub const TENANT_LABEL: &str = "tenantry.dev/tenant";

/// Label selector of every Secret tenantry manages (tenant credentials, gateway credentials).
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// The labels every Secret tenantry manages carries: what [`managed_selector`] selects.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY.into())])
}

/// The credentials Secret a Tenant uses: the one its status names once issued, else the one its
/// spec asks for.
pub fn effective_secret_name(tenant: &Tenant) -> String {
    tenant
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| tenant.secret_name())
}

/// Minimum length of a tenant's JWT signing key.
pub const MIN_JWT_KEY_BYTES: usize = 32;

/// Minimum length of the platform signing key every tenant's JWT key is derived from.
pub const MIN_PLATFORM_KEY_BYTES: usize = 32;

/// Key, in the platform signing-key Secret, holding the key.
pub const PLATFORM_KEY: &str = "key";

/// A new platform signing key: 64 alphanumeric characters (about 381 bits), used as stored.
pub fn generate_platform_key() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

/// The HS256 signing key of the Tenant with `uid`: HKDF-SHA256 (RFC 5869) of the platform key,
/// with the Tenant's uid as context, as 64 URL-safe base64 characters (the key is the string's
/// bytes, as stored in the `jwt-key` of the credentials Secret). The API derives the same key
/// from the Tenant it watches, so it needs no access to any tenant's Secret; a Tenant deleted
/// and created again gets a new key.
pub fn derive_jwt_key(platform_key: &[u8], uid: &str) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"tenantry.dev/jwt-key"), platform_key);
    let mut okm = [0u8; 48];
    hk.expand(format!("v1:{uid}").as_bytes(), &mut okm)
        .expect("48 bytes is a valid HKDF-SHA256 output length");
    URL_SAFE_NO_PAD.encode(okm)
}

/// The gateway role's password on server `server` other than the default one: HKDF-SHA256 of
/// the gateway's password (the default server's), with the server's name as context, as 43
/// URL-safe base64 characters. The operator sets it, the API derives it from its own login:
/// what one server learns (a server asking for a cleartext password sees it) opens no other.
pub fn server_gateway_password(gateway_password: &str, server: &str) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(
        Some(b"tenantry.dev/gateway-password"),
        gateway_password.as_bytes(),
    );
    let mut okm = [0u8; 32];
    hk.expand(format!("v1:{server}").as_bytes(), &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    URL_SAFE_NO_PAD.encode(okm)
}

/// The keys of every credentials Secret.
pub const KEYS: [&str; 9] = [
    "host", "port", "dbname", "username", "password", "schema", "uri", "jdbc-uri", "jwt-key",
];

/// Key of the tenant's JWT signing key (HS256; the key is the value's bytes as stored).
pub const JWT_KEY: &str = "jwt-key";

/// What a credentials Secret carries that cannot be derived: the role's password and the
/// tenant's token signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub password: String,
    pub jwt_key: String,
}

/// Who a credentials Secret logs in as, into which schema, and the rotation it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Login<'a> {
    /// The tenant's schema (its `search_path`).
    pub schema: &'a Ident,
    /// The login identity: the app role or the second identity of credential rotation.
    pub user: &'a Ident,
    /// When the Secret got this identity (RFC 3339), written as an annotation.
    pub rotated_at: Option<&'a str>,
    /// The rotate request this identity answered, written as an annotation.
    pub request: Option<&'a str>,
}

impl<'a> Login<'a> {
    /// The app role logging into its own schema, with no rotation record.
    pub fn app(schema: &'a Ident) -> Self {
        Self {
            schema,
            user: schema,
            rotated_at: None,
            request: None,
        }
    }
}

/// Percent-encodes a value for a connection URI: every byte but ASCII letters and digits.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// Every byte but RFC 3986's unreserved characters: how TLS parameter values are encoded, so
/// that `sslmode=verify-full` reads as it always did.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `&name=value…` for a libpq URI query: the endpoint's TLS parameters, values percent-encoded.
pub fn uri_tls(endpoint: &Endpoint) -> String {
    endpoint
        .tls
        .iter()
        .map(|(n, v)| format!("&{n}={}", utf8_percent_encode(v, QUERY_VALUE)))
        .collect()
}

/// `&name=value…` for a pgjdbc URL query: the TLS parameters pgjdbc knows, by its names.
pub fn jdbc_tls(endpoint: &Endpoint) -> String {
    endpoint
        .tls
        .iter()
        .filter_map(|(n, v)| {
            let jdbc = TLS_PARAMS.iter().find(|(p, _)| p == n)?.1?;
            Some(format!("&{jdbc}={}", utf8_percent_encode(v, QUERY_VALUE)))
        })
        .collect()
}

/// The Secret's `data`, as plain strings.
pub fn credentials(endpoint: &Endpoint, login: &Login, m: &Material) -> BTreeMap<String, String> {
    let password = m.password.as_str();
    let user = login.user.as_str();
    let schema = login.schema.as_str();
    // A host that is a socket directory must be passed as a query parameter in URIs.
    let (authority, host_param) = if endpoint.host.starts_with('/') {
        (String::new(), format!("&host={}", encode(&endpoint.host)))
    } else {
        (
            format!("{}:{}", endpoint.host, endpoint.port),
            String::new(),
        )
    };
    let uri = format!(
        "postgresql://{}:{}@{}/{}?options={}{}{}{}",
        encode(user),
        encode(password),
        authority,
        encode(&endpoint.dbname),
        encode(&format!("-c search_path={schema}")),
        host_param,
        if endpoint.host.starts_with('/') {
            format!("&port={}", endpoint.port)
        } else {
            String::new()
        },
        uri_tls(endpoint)
    );
    let jdbc = format!(
        "jdbc:postgresql://{}:{}/{}?currentSchema={}&user={}&password={}{}",
        endpoint.host,
        endpoint.port,
        encode(&endpoint.dbname),
        encode(schema),
        encode(user),
        encode(password),
        jdbc_tls(endpoint)
    );
    BTreeMap::from([
        ("host".into(), endpoint.host.clone()),
        ("port".into(), endpoint.port.to_string()),
        ("dbname".into(), endpoint.dbname.clone()),
        ("username".into(), user.to_string()),
        ("password".into(), password.to_string()),
        ("schema".into(), schema.to_string()),
        ("uri".into(), uri),
        ("jdbc-uri".into(), jdbc),
        (JWT_KEY.into(), m.jwt_key.clone()),
    ])
}

/// The complete desired Secret for `tenant`, owned by it.
pub fn desired(tenant: &Tenant, endpoint: &Endpoint, login: &Login, m: &Material) -> Secret {
    use crate::domain::rotation::{SECRET_REQUEST_ANNOTATION, SECRET_ROTATED_AT_ANNOTATION};
    let digest = password_digest(login.user.as_str(), &m.password);
    let annotations: BTreeMap<String, String> = [
        (SECRET_ROTATED_AT_ANNOTATION, login.rotated_at),
        (SECRET_REQUEST_ANNOTATION, login.request),
        (PASSWORD_DIGEST_ANNOTATION, Some(digest.as_str())),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
    .collect();
    let mut data = credentials(endpoint, login, m);
    let extra = super::template::render(&tenant.spec.credentials.template, &data);
    data.extend(extra);
    let data = data
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(tenant.secret_name()),
            namespace: tenant.namespace(),
            labels: Some(labels(tenant)),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: tenant.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

pub fn labels(tenant: &Tenant) -> BTreeMap<String, String> {
    let mut labels = managed_labels();
    labels.insert(TENANT_LABEL.into(), tenant.name_any());
    labels
}

/// What to do about the credentials Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It is complete and its password works: write nothing.
    Keep,
    /// Rewrite it with this (still valid) material: keys, labels or owner drifted.
    Repair(Material),
    /// Set a new password on the role and write the Secret with it (and this signing key).
    Rotate { reason: String, jwt_key: String },
    /// A Secret of that name exists and is not this Tenant's: leave it alone.
    Conflict { message: String },
}

/// Decides about an existing Secret for `login` (the current identity). `jwt_key` is the
/// tenant's signing key (see [`derive_jwt_key`]); `verifier` is the identity's stored SCRAM
/// verifier when readable; `fresh_password` is set when the identity got it in this
/// reconcile (created, or rotated to). A Secret naming another identity is repaired to this
/// one, with its password when it checks out against this identity: tamper repair follows
/// the current identity and never goes back to a previous one.
pub fn decide(
    tenant: &Tenant,
    existing: Option<&Secret>,
    endpoint: &Endpoint,
    login: &Login,
    jwt_key: &str,
    verifier: Option<&str>,
    fresh_password: Option<&str>,
) -> Decision {
    let jwt_key = jwt_key.to_string();
    let Some(secret) = existing else {
        return match fresh_password {
            Some(p) => Decision::Repair(Material {
                password: p.into(),
                jwt_key,
            }),
            None => Decision::Rotate {
                reason: "Secret is missing".into(),
                jwt_key,
            },
        };
    };
    let ours = secret.owner_references().iter().any(|o| {
        o.kind == "Tenant"
            && o.name == tenant.name_any()
            && o.api_version.starts_with("tenantry.dev/")
    });
    if !ours {
        return Decision::Conflict {
            message: format!(
                "Secret {} exists and is not owned by this Tenant; delete it or set spec.credentials.secretName",
                secret.name_any()
            ),
        };
    }
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|v| !v.is_empty())
    };
    if let Some(p) = fresh_password {
        return Decision::Repair(Material {
            password: p.into(),
            jwt_key,
        });
    }
    let Some(password) = value("password") else {
        return Decision::Rotate {
            reason: "Secret has no password".into(),
            jwt_key,
        };
    };
    let refuted = match verifier {
        Some(v) => !scram::verify(&password, v),
        // Without the verifier: the digest the operator wrote beside the password, when the
        // Secret has one (a Secret from before it has none, and is trusted).
        None => secret
            .annotations()
            .get(PASSWORD_DIGEST_ANNOTATION)
            .is_some_and(|d| *d != password_digest(login.user.as_str(), &password)),
    };
    if refuted {
        return Decision::Rotate {
            reason: "Secret password does not match the role".into(),
            jwt_key,
        };
    }
    let material = Material { password, jwt_key };
    let want = desired(tenant, endpoint, login, &material);
    let same_data = secret.data == want.data;
    let same_owner = secret.metadata.owner_references == want.metadata.owner_references;
    let labels_ok = want
        .metadata
        .labels
        .as_ref()
        .expect("desired Secret has labels")
        .iter()
        .all(|(k, v)| secret.labels().get(k) == Some(v));
    if same_data && same_owner && labels_ok {
        Decision::Keep
    } else {
        Decision::Repair(material)
    }
}

/// Annotation of the credentials Secret: [`password_digest`] of the login and the password the
/// operator wrote, in the same write. A Secret whose `password` was changed since (by hand, by
/// a tool re-applying an old manifest) no longer matches it, which any admin can see — reading
/// the role's verifier needs a superuser.
pub const PASSWORD_DIGEST_ANNOTATION: &str = "tenantry.dev/password-digest";

/// SHA-256 (hex) of a domain label, `identity` and `password`. The passwords the operator
/// writes are 32 random characters, so the digest reveals nothing about them.
pub fn password_digest(identity: &str, password: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"tenantry.dev/password-digest:v1\0");
    h.update(identity.as_bytes());
    h.update(b"\0");
    h.update(password.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    #[test]
    fn each_server_has_its_own_gateway_password() {
        let a = server_gateway_password("secret", "db2");
        assert_eq!(a.len(), 43);
        assert_eq!(a, server_gateway_password("secret", "db2"));
        assert_ne!(a, server_gateway_password("secret", "db3"));
        assert_ne!(a, server_gateway_password("other", "db2"));
        assert!(!a.contains("secret"));
    }

    fn tenant() -> Tenant {
        let mut t = Tenant::test("acme").in_namespace("ns");
        t.metadata.uid = Some("uid-1".into());
        t
    }

    fn ep() -> Endpoint {
        Endpoint {
            host: "db.example".into(),
            port: 5432,
            dbname: "app".into(),
            tls: Vec::new(),
        }
    }

    fn id() -> Ident {
        Ident::parse("schema", "ns_acme").unwrap()
    }

    fn key() -> String {
        "k".repeat(64)
    }

    fn m(p: &str) -> Material {
        Material {
            password: p.into(),
            jwt_key: "k".repeat(64),
        }
    }

    #[test]
    fn credentials_have_every_key_and_usable_uris() {
        let c = credentials(&ep(), &Login::app(&id()), &m("pw"));
        assert_eq!(
            c.keys().map(String::as_str).collect::<Vec<_>>().len(),
            KEYS.len()
        );
        for k in KEYS {
            assert!(c.contains_key(k), "{k}");
        }
        assert_eq!(
            c["uri"],
            "postgresql://ns%5Facme:pw@db.example:5432/app?options=%2Dc%20search%5Fpath%3Dns%5Facme"
        );
        assert!(c["jdbc-uri"]
            .starts_with("jdbc:postgresql://db.example:5432/app?currentSchema=ns%5Facme"));
        // TLS settings reach both URIs, encoded; pgjdbc gets only what it knows, by its names.
        let mut tls = ep();
        tls.set_tls_param("sslrootcert", "/etc/db ca/ca.crt")
            .unwrap();
        tls.set_tls_param("sslmode", "verify-full").unwrap();
        tls.set_tls_param("sslnegotiation", "direct").unwrap();
        tls.set_tls_param("sslcrl", "/etc/db/crl.pem").unwrap();
        let c = credentials(&tls, &Login::app(&id()), &m("pw"));
        assert!(
            c["uri"].ends_with(
                "search%5Fpath%3Dns%5Facme&sslmode=verify-full&sslnegotiation=direct\
                 &sslrootcert=%2Fetc%2Fdb%20ca%2Fca.crt&sslcrl=%2Fetc%2Fdb%2Fcrl.pem"
            ),
            "{}",
            c["uri"]
        );
        assert!(
            c["jdbc-uri"].ends_with(
                "&password=pw&sslmode=verify-full&sslNegotiation=direct\
                 &sslrootcert=%2Fetc%2Fdb%20ca%2Fca.crt"
            ),
            "{}",
            c["jdbc-uri"]
        );
        // An empty value removes a parameter; unknown names and bad values are refused.
        tls.set_tls_param("sslcrl", "").unwrap();
        assert_eq!(tls.tls_param("sslcrl"), None);
        assert!(tls.set_tls_param("sslpassword", "x").is_err());
        assert!(tls.set_tls_param("sslmode", "on").is_err());
        assert!(tls.set_tls_param("sslrootcert", "a\nb").is_err());
    }

    #[test]
    fn derived_keys_differ_per_tenant_and_platform_key() {
        let a = derive_jwt_key(b"platform-key-0123456789abcdef0123", "uid-1");
        assert_eq!(a.len(), 64);
        assert!(a.len() >= MIN_JWT_KEY_BYTES);
        assert_eq!(
            a,
            derive_jwt_key(b"platform-key-0123456789abcdef0123", "uid-1")
        );
        assert_ne!(
            a,
            derive_jwt_key(b"platform-key-0123456789abcdef0123", "uid-2")
        );
        assert_ne!(
            a,
            derive_jwt_key(b"another-platform-key-0123456789ab", "uid-1")
        );
    }

    #[test]
    fn missing_secret_rotates_unless_password_is_fresh() {
        let t = tenant();
        assert!(matches!(
            decide(&t, None, &ep(), &Login::app(&id()), &key(), None, None),
            Decision::Rotate { .. }
        ));
        match decide(&t, None, &ep(), &Login::app(&id()), &key(), None, Some("p")) {
            Decision::Repair(m) => {
                assert_eq!(m.password, "p");
                assert!(m.jwt_key.len() >= MIN_JWT_KEY_BYTES);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_digest_written_beside_the_password_refutes_a_changed_one() {
        let t = tenant();
        let user = id();
        let login = Login::app(&user);
        let mut s = desired(&t, &ep(), &login, &m("pw"));
        let digest = s.annotations().get(PASSWORD_DIGEST_ANNOTATION).cloned();
        assert_eq!(digest, Some(password_digest(id().as_str(), "pw")));
        assert_eq!(
            decide(&t, Some(&s), &ep(), &login, &key(), None, None),
            Decision::Keep
        );
        // The password changed, the digest not: a new password.
        s.data
            .as_mut()
            .unwrap()
            .insert("password".into(), ByteString(b"guessed".to_vec()));
        assert_eq!(
            decide(&t, Some(&s), &ep(), &login, &key(), None, None),
            Decision::Rotate {
                reason: "Secret password does not match the role".into(),
                jwt_key: key(),
            }
        );
        // Bound to the login: the same password of another identity differs.
        assert_ne!(
            password_digest("other_role", "pw"),
            password_digest(id().as_str(), "pw")
        );
        // A Secret without the digest (written before it existed) is trusted; it gains the
        // digest at its next write.
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(PASSWORD_DIGEST_ANNOTATION);
        let fixed = desired(&t, &ep(), &login, &m("guessed"));
        s.data = fixed.data;
        assert_eq!(
            decide(&t, Some(&s), &ep(), &login, &key(), None, None),
            Decision::Keep
        );
    }

    #[test]
    fn unchanged_secret_is_kept_and_drift_is_repaired() {
        let t = tenant();
        let s = desired(&t, &ep(), &Login::app(&id()), &m("pw"));
        let v = scram::verifier("pw");
        assert_eq!(
            decide(
                &t,
                Some(&s),
                &ep(),
                &Login::app(&id()),
                &key(),
                Some(&v),
                None
            ),
            Decision::Keep
        );

        let mut tampered = s.clone();
        tampered
            .data
            .as_mut()
            .unwrap()
            .insert("host".into(), ByteString(b"evil".to_vec()));
        assert_eq!(
            decide(
                &t,
                Some(&tampered),
                &ep(),
                &Login::app(&id()),
                &key(),
                Some(&v),
                None
            ),
            Decision::Repair(m("pw"))
        );

        let other_v = scram::verifier("other");
        // A new password keeps the signing key.
        assert_eq!(
            decide(
                &t,
                Some(&s),
                &ep(),
                &Login::app(&id()),
                &key(),
                Some(&other_v),
                None
            ),
            Decision::Rotate {
                reason: "Secret password does not match the role".into(),
                jwt_key: "k".repeat(64)
            }
        );
    }

    #[test]
    fn template_keys_are_rendered_and_a_template_change_repairs_with_the_same_password() {
        let plain = tenant();
        let s = desired(&plain, &ep(), &Login::app(&id()), &m("pw"));
        let mut t = tenant();
        t.spec
            .credentials
            .template
            .insert("DATABASE_URL".into(), "{{ .uri }}".into());
        let v = scram::verifier("pw");
        assert_eq!(
            decide(
                &t,
                Some(&s),
                &ep(),
                &Login::app(&id()),
                &key(),
                Some(&v),
                None
            ),
            Decision::Repair(m("pw"))
        );
        let with = desired(&t, &ep(), &Login::app(&id()), &m("pw"));
        let data = with.data.as_ref().unwrap();
        assert_eq!(data["DATABASE_URL"], data["uri"]);
        assert_eq!(
            decide(
                &t,
                Some(&with),
                &ep(),
                &Login::app(&id()),
                &key(),
                Some(&v),
                None
            ),
            Decision::Keep
        );
        // A new password re-renders the template.
        let next = desired(&t, &ep(), &Login::app(&id()), &m("pw2"));
        assert_ne!(
            next.data.as_ref().unwrap()["DATABASE_URL"],
            data["DATABASE_URL"]
        );
    }

    #[test]
    fn a_second_identity_logs_into_the_tenant_schema_and_repair_follows_it() {
        let t = tenant();
        let (schema, b) = (id(), Ident::parse("role", "ns_acme_b").unwrap());
        let login_b = Login {
            schema: &schema,
            user: &b,
            rotated_at: Some("2026-01-01T00:00:00Z"),
            request: Some("1"),
        };
        let s = desired(&t, &ep(), &login_b, &m("pwb"));
        let c = credentials(&ep(), &login_b, &m("pwb"));
        assert_eq!(c["username"], "ns_acme_b");
        assert_eq!(c["schema"], "ns_acme");
        assert!(
            c["uri"].contains("search%5Fpath%3Dns%5Facme&")
                || c["uri"].ends_with("search%5Fpath%3Dns%5Facme"),
            "{}",
            c["uri"]
        );
        assert!(c["jdbc-uri"].contains("currentSchema=ns%5Facme&user=ns%5Facme%5Fb&"));
        let ann = s.metadata.annotations.clone().unwrap();
        assert_eq!(ann["tenantry.dev/rotated-at"], "2026-01-01T00:00:00Z");
        assert_eq!(ann["tenantry.dev/rotate-request"], "1");
        let v = scram::verifier("pwb");
        assert_eq!(
            decide(&t, Some(&s), &ep(), &login_b, &key(), Some(&v), None),
            Decision::Keep
        );
        // Someone puts the previous identity back into the Secret, with the current
        // identity's password: repaired to the current identity, with that password.
        let mut back = s.clone();
        back.data
            .as_mut()
            .unwrap()
            .insert("username".into(), ByteString(b"ns_acme".to_vec()));
        assert_eq!(
            decide(&t, Some(&back), &ep(), &login_b, &key(), Some(&v), None),
            Decision::Repair(m("pwb"))
        );
        // The previous identity's whole Secret: its password is not the current one's.
        let old = desired(&t, &ep(), &Login::app(&schema), &m("pwa"));
        assert!(matches!(
            decide(&t, Some(&old), &ep(), &login_b, &key(), Some(&v), None),
            Decision::Rotate { .. }
        ));
    }

    #[test]
    fn foreign_secret_is_a_conflict() {
        let t = tenant();
        let foreign = Secret {
            metadata: ObjectMeta {
                name: Some("acme-db".into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        };
        assert!(matches!(
            decide(
                &t,
                Some(&foreign),
                &ep(),
                &Login::app(&id()),
                &key(),
                None,
                None
            ),
            Decision::Conflict { .. }
        ));
    }
}
