//! Deletion according to `deletionPolicy`, behind the finalizer.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::DeleteParams,
    runtime::{controller::Action, events::EventType},
    Api, ResourceExt,
};
use tracing::warn;

use super::{
    context::Context,
    error::{db, kube_err},
    reconcile::{now, write_status},
    Error, Stage,
};
use crate::domain::{
    crd::{Phase, Tenant},
    naming::Ident,
    plan,
    state::Holder,
    status::StatusBuilder,
};

/// Deletion according to `deletionPolicy`. Never reports success before the database work is
/// done; copes with a Tenant that was never provisioned.
pub(super) async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        tenant.namespace().unwrap_or_default(),
        tenant.name_any()
    );
    // What was provisioned (status.schema) wins over what the spec says now.
    let id = tenant
        .status
        .as_ref()
        .and_then(|s| s.schema.as_deref())
        .and_then(|s| Ident::parse("schema", s).ok())
        .or_else(|| plan::plan(tenant).ok().map(|p| p.ident));
    if let Some(id) = id {
        if let Err(e) = cleanup_database(tenant, &id, ctx).await {
            let mut b =
                StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now());
            let message = format!("deletion is waiting for the database: {e}");
            b.not_ready("DeletionPending", message.clone(), Phase::Deleting);
            ctx.event(
                tenant,
                EventType::Warning,
                "DeletionPending",
                "Delete",
                message,
            )
            .await;
            if let Err(e) = write_status(tenant, b.build(), ctx).await {
                warn!(error = %e, "could not record deletion failure in status");
            }
            return Err(e);
        }
    }
    // The Secret is owned by the Tenant and would be garbage-collected; deleting it here makes
    // the credentials of a LOGIN-revoked or dropped role disappear at once.
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    if let Some(s) = secrets
        .get_opt(&tenant.secret_name())
        .await
        .map_err(kube_err(Stage::Cleanup))?
    {
        let uid = tenant.uid();
        if s.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
        {
            secrets
                .delete(&s.name_any(), &DeleteParams::default())
                .await
                .map_err(kube_err(Stage::Cleanup))?;
        }
    }
    ctx.metrics.set_phase(key, None);
    ctx.retrigger_related(tenant, true);
    Ok(Action::await_change())
}

pub(super) async fn cleanup_database(
    tenant: &Tenant,
    id: &Ident,
    ctx: &Context,
) -> Result<(), Error> {
    let owner = crate::domain::state::Owner::new(
        &tenant.namespace().unwrap_or_default(),
        &tenant.name_any(),
        tenant.metadata.uid.as_deref().unwrap_or_default(),
    );
    let observed = ctx.admin.observe(id).await.map_err(db(Stage::Cleanup))?;
    let role_ours = observed.role_holder(&owner) == Holder::ThisTenant;
    let schema_ours = observed.schema_holder(&owner) == Holder::ThisTenant;
    match tenant.spec.deletion_policy {
        crate::domain::crd::DeletionPolicy::Retain => {
            if role_ours {
                ctx.admin.retain(id).await.map_err(db(Stage::Cleanup))?;
                ctx.event(
                    tenant,
                    EventType::Normal,
                    "Retained",
                    "Delete",
                    format!(
                        "kept schema {} and its data; role {} can no longer log in",
                        id.as_str(),
                        id.as_str()
                    ),
                )
                .await;
            }
        }
        crate::domain::crd::DeletionPolicy::Delete => {
            if role_ours || schema_ours {
                ctx.admin
                    .drop_tenant(id, schema_ours, role_ours)
                    .await
                    .map_err(db(Stage::Cleanup))?;
                ctx.event(
                    tenant,
                    EventType::Normal,
                    "Deleted",
                    "Delete",
                    format!(
                        "dropped schema {} with its data and role {}",
                        id.as_str(),
                        id.as_str()
                    ),
                )
                .await;
            }
        }
    }
    Ok(())
}
