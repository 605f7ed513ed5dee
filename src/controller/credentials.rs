//! Credentials I/O: reading a Tenant's Secret (watch cache first), acting on the decision of
//! the credentials contract ([`crate::domain::credentials`]), and writing Secrets with
//! server-side apply.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
    Api, ResourceExt,
};

use super::{
    context::Context,
    error::{db, kube_err},
    reconcile::{Note, FIELD_MANAGER},
    Error, Stage,
};
use crate::domain::{
    crd::Tenant,
    credentials::{self as contract, Decision, Login, Material},
    scram,
};

/// Where the credentials step ended.
#[derive(Debug)]
pub(super) enum Issued {
    /// The Secret is complete and its password works. `wrote` says what was written now, if
    /// anything; `version` is the Secret's resourceVersion.
    Ready {
        version: Option<String>,
        wrote: Option<Note>,
    },
    /// A Secret of that name is not this Tenant's; it is left alone.
    Conflict(String),
}

/// Makes sure `tenant`'s Secret holds working credentials for `login`. `verifier` is the
/// identity's stored SCRAM verifier when readable; `fresh_password` is set when the identity
/// got it in this reconcile (created, or rotated to).
pub(super) async fn ensure(
    tenant: &Tenant,
    login: &Login<'_>,
    secret_name: &str,
    verifier: Option<&str>,
    fresh_password: Option<&str>,
    admin: &crate::postgres::Admin,
    ctx: &Context,
) -> Result<Issued, Error> {
    let ns = tenant.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let endpoint = admin.endpoint();
    // The watch cache answers the common case (nothing to do) without an apiserver call; any
    // other verdict is confirmed on a live read, because the cache may lag our own writes.
    let mut existing = ctx
        .secrets
        .get(&ObjectRef::new(secret_name).within(&ns))
        .map(|s| (*s).clone());
    let jwt_key = ctx.jwt_key(tenant);
    let decide = |existing: Option<&Secret>| {
        contract::decide(
            tenant,
            existing,
            endpoint,
            login,
            &jwt_key,
            verifier,
            fresh_password,
        )
    };
    let mut decision = decide(existing.as_ref());
    if decision != Decision::Keep {
        existing = secrets
            .get_opt(secret_name)
            .await
            .map_err(kube_err(Stage::Credentials))?;
        decision = decide(existing.as_ref());
    }
    let reason = if existing.is_some() {
        "CredentialsRepaired"
    } else {
        "CredentialsIssued"
    };
    let (material, note) = match decision {
        Decision::Keep => {
            return Ok(Issued::Ready {
                version: existing.and_then(|s| s.metadata.resource_version),
                wrote: None,
            });
        }
        Decision::Conflict { message } => return Ok(Issued::Conflict(message)),
        Decision::Repair(material) => {
            let what = if existing.is_some() {
                "repaired"
            } else {
                "issued"
            };
            (material, format!("{what} Secret {secret_name}"))
        }
        Decision::Rotate { reason, jwt_key } => {
            let password = scram::generate_password();
            admin
                .set_password(login.user, &password)
                .await
                .map_err(db(Stage::Credentials))?;
            (
                Material { password, jwt_key },
                format!("{reason}: set a new password and wrote Secret {secret_name}"),
            )
        }
    };
    let desired = contract::desired(tenant, endpoint, login, &material);
    let mut written = apply_secret(&secrets, &desired)
        .await
        .map_err(kube_err(Stage::Credentials))?;
    // Keys someone else added are not ours to keep: server-side apply leaves fields of other
    // field managers in place, and the Secret would never match again (a repair at every
    // verification). A merge patch removes them.
    let extra: serde_json::Map<String, serde_json::Value> = written
        .data
        .iter()
        .flat_map(|d| d.keys())
        .filter(|k| !desired.data.as_ref().is_some_and(|d| d.contains_key(*k)))
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    if !extra.is_empty() {
        written = secrets
            .patch(
                secret_name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "data": extra })),
            )
            .await
            .map_err(kube_err(Stage::Credentials))?;
    }
    Ok(Issued::Ready {
        version: written.metadata.resource_version,
        wrote: Some(Note::normal(reason, "Provision", note)),
    })
}

/// Writes `desired` with server-side apply as the operator's field manager, taking over any
/// field someone else set.
pub(super) async fn apply_secret(
    secrets: &Api<Secret>,
    desired: &Secret,
) -> Result<Secret, kube::Error> {
    secrets
        .patch(
            &desired.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await
}

/// The credentials Secret `secret_name` of `tenant`, from the watch cache; `live` reads it
/// from the apiserver instead (the cache may lag our own writes).
pub(super) async fn read(
    tenant: &Tenant,
    secret_name: &str,
    live: bool,
    ctx: &Context,
) -> Result<Option<Secret>, Error> {
    let ns = tenant.namespace().unwrap_or_default();
    if !live {
        return Ok(ctx
            .secrets
            .get(&ObjectRef::new(secret_name).within(&ns))
            .map(|s| (*s).clone()));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    secrets
        .get_opt(secret_name)
        .await
        .map_err(kube_err(Stage::Credentials))
}
