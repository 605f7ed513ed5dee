//! The API gateway role and its credentials Secret, bootstrapped at start-up.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};
use tracing::info;

use super::reconcile::FIELD_MANAGER;
use crate::{domain::credentials as secret, postgres::Admin};
/// Makes sure the API gateway role exists and its credentials Secret matches it. A Secret
/// created beforehand by the platform supplies the password; otherwise one is generated.
pub async fn ensure_gateway(
    client: &Client,
    admin: &Admin,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let Some(gw) = admin.gateway() else {
        return Ok(());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets.get_opt(name).await?;
    let password = existing
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|p| !p.is_empty());
    let password = match password {
        Some(p) => p,
        None => crate::domain::scram::generate_password(),
    };
    admin.ensure_gateway(&password).await?;
    let ep = admin.endpoint();
    let uri = format!(
        "postgresql://{}:{}@{}:{}/{}",
        gw.as_str(),
        percent_encoding::utf8_percent_encode(&password, percent_encoding::NON_ALPHANUMERIC),
        ep.host,
        ep.port,
        ep.dbname
    );
    let data: std::collections::BTreeMap<String, k8s_openapi::ByteString> = [
        ("username", gw.as_str().to_string()),
        ("password", password),
        ("host", ep.host.clone()),
        ("port", ep.port.to_string()),
        ("dbname", ep.dbname.clone()),
        ("uri", uri),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.into_bytes())))
    .collect();
    if existing.as_ref().and_then(|s| s.data.as_ref()) == Some(&data) {
        return Ok(());
    }
    let desired = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [
                    (
                        secret::MANAGED_BY_LABEL.to_string(),
                        secret::MANAGED_BY.to_string(),
                    ),
                    (
                        "app.kubernetes.io/component".to_string(),
                        "gateway-credentials".to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    secrets
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
    info!(role = gw.as_str(), secret = %format!("{namespace}/{name}"), "gateway credentials written");
    Ok(())
}
