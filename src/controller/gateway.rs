//! What the API needs from the operator, bootstrapped at start-up: the gateway role and its
//! credentials Secret, and the platform signing key (the API derives every tenant's token key
//! from it, so it needs no tenant's Secret). The Secret
//! follows the credentials contract ([`crate::domain::credentials`]): its URI encoding and its
//! managed-by label, so the operator's Secret watch sees it.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{api::ObjectMeta, Api, Client};
use tracing::info;

use super::credentials::apply_secret;
use crate::{
    domain::{credentials as contract, naming::Ident, scram, state::Endpoint},
    postgres::Admin,
};

/// Label telling the gateway's Secret apart from tenants' credentials.
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
const COMPONENT: &str = "gateway-credentials";

/// Why the gateway role or its Secret could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway credentials Secret: {0}")]
    Kube(#[from] kube::Error),
    #[error("gateway role: {0}")]
    Database(#[from] sqlx::Error),
    #[error("signing key Secret {0} holds no usable key (key {key:?}, at least {min} bytes); fix or delete it", key = contract::PLATFORM_KEY, min = contract::MIN_PLATFORM_KEY_BYTES)]
    BadSigningKey(String),
}

/// Reads the platform signing key from Secret `namespace/name`, creating the Secret with a new
/// random key when it does not exist. An existing key is never replaced (that would invalidate
/// every tenant's tokens); replacing it is the platform's deliberate act.
pub async fn ensure_signing_key(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<std::sync::Arc<[u8]>, GatewayError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let key_of = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(contract::PLATFORM_KEY))
            .map(|b| b.0.clone())
    };
    if let Some(existing) = secrets.get_opt(name).await? {
        return key_of(&existing)
            .filter(|k| k.len() >= contract::MIN_PLATFORM_KEY_BYTES)
            .map(|k| std::sync::Arc::from(k.as_slice()))
            .ok_or_else(|| GatewayError::BadSigningKey(format!("{namespace}/{name}")));
    }
    let key = contract::generate_platform_key();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [(COMPONENT_LABEL.to_string(), "signing-key".to_string())]
                    .into_iter()
                    .chain(contract::managed_labels())
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            contract::PLATFORM_KEY.to_string(),
            ByteString(key.clone().into_bytes()),
        )])),
        ..Secret::default()
    };
    match secrets.create(&Default::default(), &secret).await {
        Ok(_) => {
            info!(secret = %format!("{namespace}/{name}"), "platform signing key created");
            Ok(std::sync::Arc::from(key.as_bytes()))
        }
        // Another replica created it meanwhile: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = secrets.get(name).await?;
            key_of(&existing)
                .filter(|k| k.len() >= contract::MIN_PLATFORM_KEY_BYTES)
                .map(|k| std::sync::Arc::from(k.as_slice()))
                .ok_or_else(|| GatewayError::BadSigningKey(format!("{namespace}/{name}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes sure the API gateway role exists and its credentials Secret matches it. A Secret
/// created beforehand by the platform supplies the password; otherwise one is generated.
/// Returns the password (other servers' gateway roles get the same one), if there is a
/// gateway role.
pub async fn ensure_gateway(
    client: &Client,
    admin: &Admin,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, GatewayError> {
    let Some(gw) = admin.gateway() else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets.get_opt(name).await?;
    let password = existing
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(scram::generate_password);
    admin.ensure_gateway(&password).await?;
    let desired = desired(namespace, name, gw, admin.endpoint(), password.clone());
    if existing.as_ref().and_then(|s| s.data.as_ref()) != desired.data.as_ref() {
        apply_secret(&secrets, &desired).await?;
        info!(role = gw.as_str(), secret = %format!("{namespace}/{name}"), "gateway credentials written");
    }
    Ok(Some(password))
}

/// The gateway's credentials Secret (keys username, password, host, port, dbname, uri).
fn desired(namespace: &str, name: &str, role: &Ident, ep: &Endpoint, password: String) -> Secret {
    let uri = format!(
        "postgresql://{}:{}@{}:{}/{}{}",
        role.as_str(),
        contract::encode(&password),
        ep.host,
        ep.port,
        ep.dbname,
        contract::uri_tls(ep).replacen('&', "?", 1)
    );
    let data: BTreeMap<String, ByteString> = [
        ("username", role.as_str().to_string()),
        ("password", password),
        ("host", ep.host.clone()),
        ("port", ep.port.to_string()),
        ("dbname", ep.dbname.clone()),
        ("uri", uri),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect();
    let mut labels = contract::managed_labels();
    labels.insert(COMPONENT_LABEL.into(), COMPONENT.into());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_secret_keeps_its_keys_and_is_watched() {
        let ep = Endpoint {
            host: "db.example".into(),
            port: 5432,
            dbname: "app".into(),
            tls: Vec::new(),
        };
        let role = Ident::parse_role("tenantry_gateway").unwrap();
        let s = desired("ops", "tenantry-gateway", &role, &ep, "p/w".into());
        let value = |k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
        assert_eq!(
            s.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["dbname", "host", "password", "port", "uri", "username"]
        );
        assert_eq!(
            value("uri"),
            "postgresql://tenantry_gateway:p%2Fw@db.example:5432/app"
        );
        assert_eq!(value("username"), "tenantry_gateway");
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[COMPONENT_LABEL], "gateway-credentials");
        let (key, value) = contract::managed_selector()
            .split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .unwrap();
        assert_eq!(labels.get(&key), Some(&value), "seen by the Secret watch");
    }
}
