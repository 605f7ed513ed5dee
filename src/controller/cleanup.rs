//! Deletion according to `deletionPolicy`, behind the finalizer. Never reports success before
//! the database work is done; copes with a Tenant that was never provisioned, and never
//! touches a role or schema that is not this Tenant's.

use k8s_openapi::api::core::v1::Secret;
use kube::{api::DeleteParams, runtime::controller::Action, Api, ResourceExt};

use super::{
    context::Context,
    error::{db, kube_err},
    reconcile::{now, Failure, Mark, Note, Report, Then, Warning},
    Error, Stage,
};
use crate::domain::{
    crd::{DeletionPolicy, Phase, Tenant},
    naming::Ident,
    plan,
    state::{Holder, Owner},
    status::StatusBuilder,
};
use crate::postgres::tenant::{Names, RolesToDrop};

/// Cleans up after `tenant`; returns what the reconcile should report.
pub(super) async fn cleanup(tenant: &Tenant, ctx: &Context) -> Report {
    // Someone is working on the schema by hand: deletion waits until the pause is lifted.
    if let Some(report) = super::reconcile::paused(tenant) {
        return Report {
            verdict: Err(Error::Paused),
            ..report
        };
    }
    let mut events = Vec::new();
    // What was provisioned (status.schema) wins over what the spec says now.
    let id = tenant
        .status
        .as_ref()
        .and_then(|s| s.schema.as_deref())
        .and_then(|s| Ident::parse("schema", s).ok())
        .or_else(|| plan::plan(tenant).ok().map(|p| p.ident));
    if let Some(id) = id {
        if let Err(e) = cleanup_database(tenant, &id, ctx, &mut events).await {
            let message = format!("deletion is waiting for the database: {e}");
            let failure = Failure {
                mark: Mark::NotReady,
                reason: "DeletionPending",
                phase: Phase::Deleting,
                event: Some(Warning {
                    reason: "DeletionPending",
                    action: "Delete",
                }),
                message,
                then: Then::Retry(Box::new(e)),
            };
            let b = StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now());
            return failure.report(b, events);
        }
    }
    let verdict = delete_secret(tenant, ctx).await.map(|()| {
        let key = format!(
            "{}/{}",
            tenant.namespace().unwrap_or_default(),
            tenant.name_any()
        );
        ctx.metrics.set_phase(key, None);
        ctx.retrigger_related(tenant, true);
        Action::await_change()
    });
    Report::events(events, verdict)
}

/// The Secret is owned by the Tenant and would be garbage-collected; deleting it here makes
/// the credentials of a LOGIN-revoked or dropped role disappear at once.
async fn delete_secret(tenant: &Tenant, ctx: &Context) -> Result<(), Error> {
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
    Ok(())
}

async fn cleanup_database(
    tenant: &Tenant,
    id: &Ident,
    ctx: &Context,
    events: &mut Vec<Note>,
) -> Result<(), Error> {
    let owner = Owner::new(
        &tenant.namespace().unwrap_or_default(),
        &tenant.name_any(),
        tenant.metadata.uid.as_deref().unwrap_or_default(),
    );
    let names = Names::new(id.clone());
    // Never placed: nothing can have been created but on the default server (before servers
    // were recorded, a tenant failing early had no server in its status).
    let admin = match ctx.servers.server_of(tenant) {
        None => ctx.servers.default_admin().clone(),
        Some(server) => ctx
            .servers
            .admin(&server)
            .ok_or(Error::ServerUnavailable(server))?,
    };
    let observed = admin
        .observe_tenant(&names)
        .await
        .map_err(db(Stage::Cleanup))?;
    let role_ours = observed.role_holder(&owner) == Holder::ThisTenant;
    let mut owner_ours = observed.owner_role_holder(&owner) == Holder::ThisTenant;
    let schema_ours = observed.schema_holder(&owner) == Holder::ThisTenant;
    // The second login identity of credential rotation goes under either policy.
    let b_ours = observed.login_b_holder(&owner) == Holder::ThisTenant;
    let name = id.as_str();
    // What exists without this Tenant's mark (removed or edited out of band, or never its
    // own) is kept, and said so: deletion never drops it.
    let mut kept: Vec<String> = [
        (observed.role.is_some() && !role_ours, "role", names.app()),
        (
            observed.owner_role.is_some() && !owner_ours,
            "owner role",
            &names.owner,
        ),
        (observed.schema.is_some() && !schema_ours, "schema", id),
        (
            observed.login_b.is_some() && !b_ours,
            "role",
            &names.login_b,
        ),
    ]
    .into_iter()
    .filter(|(unmarked, _, _)| *unmarked)
    .map(|(_, what, n)| format!("{what} {}", n.as_str()))
    .collect();
    let app_owns_schema = observed
        .schema
        .as_ref()
        .is_some_and(|s| s.owner_role == names.app().as_str());
    let delete = tenant.spec.deletion_policy == DeletionPolicy::Delete;
    if delete && observed.schema.is_some() && !schema_ours && owner_ours {
        // Dropping the owner role means DROP OWNED BY it, which would drop the unmarked
        // schema it owns with everything in it.
        owner_ours = false;
        kept.push(format!(
            "owner role {} (it owns that schema)",
            names.owner.as_str()
        ));
    }
    let role_ours = if delete && !schema_ours && app_owns_schema && role_ours {
        kept.push(format!("role {name} (it owns that schema)"));
        false
    } else {
        role_ours
    };
    // Reported for a tenant that was provisioned (for one that never was, what exists is
    // someone else's from the start, and the Conflict said so).
    let provisioned = tenant
        .status
        .as_ref()
        .is_some_and(|s| s.schema.as_deref() == Some(name));
    if !delete {
        // Retain touches the login only.
        kept.retain(|k| k == &format!("role {name}"));
    }
    if provisioned && !kept.is_empty() {
        let verb = if kept.len() == 1 { "was" } else { "were" };
        let what = if delete {
            format!("{} {verb} not dropped", kept.join(", "))
        } else {
            format!("{} {verb} not locked (keeps LOGIN)", kept.join(", "))
        };
        events.push(Note::warning(
            "KeptUnmarked",
            "Delete",
            format!(
                "{what}: without this Tenant's ownership mark (removed or edited out of band), \
                 or owning what is without it, nothing is ever altered or dropped. Drop or lock \
                 it by hand if it should go"
            ),
        ));
    }
    let b_note = if b_ours {
        format!(
            " and its second login identity {} was dropped",
            names.login_b.as_str()
        )
    } else {
        String::new()
    };
    match tenant.spec.deletion_policy {
        DeletionPolicy::Retain => {
            if role_ours && schema_ours && tenant.is_over_quota() {
                // The quota goes with the Tenant: a Tenant adopting the data later starts with
                // its writes (and is measured, and refused, again if still over its own).
                admin
                    .set_writes(&names, &[names.app()], true)
                    .await
                    .map_err(db(Stage::Cleanup))?;
            }
            if role_ours {
                admin
                    .retain_tenant(&names, b_ours)
                    .await
                    .map_err(db(Stage::Cleanup))?;
                events.push(Note::normal(
                    "Retained",
                    "Delete",
                    format!(
                        "kept schema {name} and its data; role {name} can no longer log in{b_note}"
                    ),
                ));
            } else if b_ours {
                admin
                    .drop_tenant_roles(
                        &names,
                        false,
                        RolesToDrop {
                            login_b: true,
                            ..RolesToDrop::default()
                        },
                    )
                    .await
                    .map_err(db(Stage::Cleanup))?;
            }
        }
        DeletionPolicy::Delete => {
            if role_ours || owner_ours || schema_ours || b_ours {
                admin
                    .drop_tenant_roles(
                        &names,
                        schema_ours,
                        RolesToDrop {
                            app: role_ours,
                            owner: owner_ours,
                            login_b: b_ours,
                        },
                    )
                    .await
                    .map_err(db(Stage::Cleanup))?;
                let dropped: Vec<String> = [
                    (schema_ours, format!("schema {name} with its data")),
                    (role_ours, format!("role {name}")),
                    (owner_ours, format!("owner role {}", names.owner.as_str())),
                    (
                        b_ours,
                        format!("second login identity {}", names.login_b.as_str()),
                    ),
                ]
                .into_iter()
                .filter_map(|(ours, what)| ours.then_some(what))
                .collect();
                events.push(Note::normal(
                    "Deleted",
                    "Delete",
                    format!("dropped {}", dropped.join(", ")),
                ));
            }
        }
    }
    Ok(())
}
