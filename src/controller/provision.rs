//! The apply pipeline: validate → routing → observe/conflicts → role → schema → migrations →
//! credentials → ready.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
    Api, ResourceExt,
};
use tracing::{info, Span};

use super::{
    context::{Context, Verified, VERIFIED_FOR},
    error::{db, kube_err},
    reconcile::{fail_after, flush, now, write_status, Journal, FIELD_MANAGER},
    rollout::{admit, Admit},
    Error, Stage,
};
use crate::domain::{
    crd::{condition, Phase, Tenant},
    credentials::{self as secret, Decision},
    naming::Ident,
    plan::{self, Plan},
    routing,
    state::Holder,
    status::StatusBuilder,
};

/// Provisions a Tenant: the pipeline of steps, each reported as a condition.
pub(super) async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let mut b = StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now());
    let previous_phase = tenant.status.as_ref().map(|s| s.phase);
    let mut journal: Journal = Vec::new();

    // 1. Validate (pure). Invalid specs wait for a change; nothing touches the database.
    let plan = match plan::plan(tenant) {
        Ok(p) => p,
        Err(message) => {
            b.not_ready("Invalid", message.clone(), Phase::Invalid);
            if previous_phase != Some(Phase::Invalid)
                || tenant.status.as_ref().and_then(|s| s.observed_generation)
                    != tenant.metadata.generation
            {
                ctx.event(
                    tenant,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    message,
                )
                .await;
            }
            write_status(tenant, b.build(), ctx).await?;
            return Ok(Action::await_change());
        }
    };
    let Plan {
        ident: id,
        owner,
        secret_name,
    } = plan;
    Span::current().record("schema", id.as_str());

    // Routing: the API refuses names and hosts that two Tenants claim; say so here.
    let all = ctx.store.state();
    let clashes = routing::clashes_among(tenant, all.iter().map(|t| &**t));
    if clashes.is_empty() {
        b.set(
            condition::ROUTABLE,
            "True",
            "Unique",
            "no other Tenant has this name or its hosts",
        );
    } else {
        let message = format!(
            "the API will not route to this tenant: {}",
            clashes.join("; ")
        );
        if tenant
            .condition(condition::ROUTABLE)
            .is_none_or(|c| c.message != message)
        {
            ctx.event(
                tenant,
                EventType::Warning,
                "AmbiguousRouting",
                "Validate",
                message.clone(),
            )
            .await;
        }
        b.set(condition::ROUTABLE, "False", "Ambiguous", message);
    }
    ctx.retrigger_related(tenant, false);

    // Fast path: nothing relevant changed since a recent full verification (our own Secret
    // and status writes come back as watch events; they need no second look).
    if let Some(wait) = recently_verified(tenant, &b, &secret_name, ctx) {
        return Ok(Action::requeue(wait));
    }

    // Read what exists, once, before changing anything: conflicts stop us with nothing done.
    let observed = match ctx.admin.observe(&id).await {
        Ok(o) => o,
        Err(e) => {
            return fail_after(
                &mut journal,
                tenant,
                b,
                condition::ROLE_READY,
                db(Stage::Role)(e),
                ctx,
            )
            .await
        }
    };
    let role_holder = observed.role_holder(&owner);
    let schema_holder = observed.schema_holder(&owner);
    for (what, step, holder) in [
        ("role", condition::ROLE_READY, &role_holder),
        ("schema", condition::SCHEMA_READY, &schema_holder),
    ] {
        let message = match holder {
            Holder::Unmanaged => format!(
                "{what} {} already exists and is not managed by tenantry; nothing was changed",
                id.as_str()
            ),
            Holder::OtherTenant(o) => format!(
                "{what} {} belongs to Tenant {}/{}; nothing was changed",
                id.as_str(),
                o.namespace,
                o.name
            ),
            _ => continue,
        };
        b.fail(step, "Conflict", message.clone(), Phase::Conflict);
        if previous_phase != Some(Phase::Conflict) {
            ctx.event(tenant, EventType::Warning, "Conflict", "Provision", message)
                .await;
        }
        write_status(tenant, b.build(), ctx).await?;
        // Someone may drop the conflicting object by hand: look again now and then.
        return Ok(Action::requeue(Duration::from_secs(300)));
    }

    // 2. Role.
    let mut fresh_password = None;
    match (&role_holder, &observed.role) {
        (Holder::Nobody, _) => {
            let password = crate::domain::scram::generate_password();
            if let Err(e) = ctx.admin.create_role(&id, &owner, &password).await {
                return fail_after(
                    &mut journal,
                    tenant,
                    b,
                    condition::ROLE_READY,
                    db(Stage::Role)(e),
                    ctx,
                )
                .await;
            }
            fresh_password = Some(password);
            journal.push(("RoleCreated", format!("created role {}", id.as_str())));
            b.ok(
                condition::ROLE_READY,
                "Created",
                format!("role {} created", id.as_str()),
            );
        }
        (_, Some(state)) => {
            if let Err(e) = ctx.admin.adopt_role(&id, &owner, state).await {
                return fail_after(
                    &mut journal,
                    tenant,
                    b,
                    condition::ROLE_READY,
                    db(Stage::Role)(e),
                    ctx,
                )
                .await;
            }
            b.ok(
                condition::ROLE_READY,
                "Exists",
                format!("role {} exists", id.as_str()),
            );
        }
        (_, None) => unreachable!("a holder other than Nobody implies the role exists"),
    }

    // 3. Schema, owned by the role, closed to everyone else.
    match (&schema_holder, &observed.schema) {
        (Holder::Nobody, _) => {
            if let Err(e) = ctx.admin.create_schema(&id, &owner).await {
                return fail_after(
                    &mut journal,
                    tenant,
                    b,
                    condition::SCHEMA_READY,
                    db(Stage::Schema)(e),
                    ctx,
                )
                .await;
            }
            journal.push((
                "SchemaCreated",
                format!(
                    "created schema {} owned by role {}",
                    id.as_str(),
                    id.as_str()
                ),
            ));
            b.ok(
                condition::SCHEMA_READY,
                "Created",
                format!("schema {} created", id.as_str()),
            );
        }
        (_, Some(state)) => {
            if let Err(e) = ctx.admin.adopt_schema(&id, &owner, state).await {
                return fail_after(
                    &mut journal,
                    tenant,
                    b,
                    condition::SCHEMA_READY,
                    db(Stage::Schema)(e),
                    ctx,
                )
                .await;
            }
            b.ok(
                condition::SCHEMA_READY,
                "Exists",
                format!("schema {} exists", id.as_str()),
            );
        }
        (_, None) => unreachable!("a holder other than Nobody implies the schema exists"),
    }
    {
        let s = b.status_mut();
        s.schema = Some(id.as_str().to_string());
        s.role = Some(id.as_str().to_string());
    }

    // 4. Migrations, as the tenant role, inside the schema.
    let mut held_back = None;
    match migrate(&id, ctx).await {
        Ok(Migrated {
            version,
            held: Some(_),
            ..
        }) if tenant
            .condition(condition::MIGRATIONS_APPLIED)
            .is_some_and(|c| c.reason == "MigrationFailed") =>
        {
            // This tenant's own failure is what holds the rollout: keep reporting it (it is
            // also what makes the halt survive a restart).
            let message = tenant
                .condition(condition::MIGRATIONS_APPLIED)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            b.status_mut().migration_version = version;
            b.fail(
                condition::MIGRATIONS_APPLIED,
                "MigrationFailed",
                message,
                Phase::Failed,
            );
            flush(tenant, &mut journal, ctx).await;
            write_status(tenant, b.build(), ctx).await?;
            return Ok(Action::requeue(Duration::from_secs(600)));
        }
        Ok(Migrated {
            version,
            held: Some((reason, message)),
            ..
        }) => {
            // The tenant keeps working at its current version meanwhile.
            b.status_mut().migration_version = version;
            if reason == "RolloutHalted"
                && tenant
                    .condition(condition::MIGRATIONS_APPLIED)
                    .is_none_or(|c| c.reason != reason)
            {
                ctx.event(
                    tenant,
                    EventType::Warning,
                    reason,
                    "Migrate",
                    message.clone(),
                )
                .await;
            }
            b.set(condition::MIGRATIONS_APPLIED, "False", reason, message);
            held_back = Some(reason);
        }
        Ok(Migrated {
            version,
            applied,
            held: None,
        }) => {
            b.status_mut().migration_version = version;
            let v = version.map_or("none".to_string(), |v| v.to_string());
            if !applied.is_empty() {
                let list = applied
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                // A fleet rollout is reported per tenant by status.migrationVersion and in
                // aggregate by metrics and log lines; an Event per tenant would double the
                // apiserver writes of a rollout.
                if previous_phase == Some(Phase::Ready) {
                    tracing::debug!(versions = %list, "applied migrations");
                } else {
                    journal.push((
                        "MigrationsApplied",
                        format!("applied migrations {list} (schema at version {v})"),
                    ));
                }
            }
            b.ok(
                condition::MIGRATIONS_APPLIED,
                "UpToDate",
                format!("schema at migration version {v}"),
            );
        }
        Err(Error::Migration(e)) if !e.is_transient() => {
            let message = e.to_string();
            b.fail(
                condition::MIGRATIONS_APPLIED,
                "MigrationFailed",
                message.clone(),
                Phase::Failed,
            );
            if tenant
                .condition(condition::MIGRATIONS_APPLIED)
                .is_none_or(|c| c.message != message)
            {
                ctx.event(
                    tenant,
                    EventType::Warning,
                    "MigrationFailed",
                    "Migrate",
                    message,
                )
                .await;
            }
            flush(tenant, &mut journal, ctx).await;
            write_status(tenant, b.build(), ctx).await?;
            // Fixing a migration means a new migration set, which restarts the operator.
            return Ok(Action::requeue(Duration::from_secs(600)));
        }
        Err(e) => {
            return fail_after(
                &mut journal,
                tenant,
                b,
                condition::MIGRATIONS_APPLIED,
                e,
                ctx,
            )
            .await
        }
    }

    // 5. Credentials Secret.
    let verifier = observed.role.as_ref().and_then(|r| r.verifier.clone());
    let secret_version = match credentials(
        tenant,
        &id,
        &secret_name,
        verifier.as_deref(),
        fresh_password.as_deref(),
        &mut b,
        &mut journal,
        ctx,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            return fail_after(
                &mut journal,
                tenant,
                b,
                condition::CREDENTIALS_READY,
                e,
                ctx,
            )
            .await
        }
    };
    if b.clone().build().phase == Phase::Conflict {
        flush(tenant, &mut journal, ctx).await;
        write_status(tenant, b.build(), ctx).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    b.status_mut().secret_name = Some(secret_name.clone());

    // 6. Ready.
    b.ready(format!(
        "schema {} ready with credentials in Secret {secret_name}",
        id.as_str()
    ));
    let status = b.build();
    if previous_phase != Some(Phase::Ready) {
        info!(schema = id.as_str(), "tenant provisioned");
        // One Event for the whole provisioning (each apiserver write costs at fleet scale);
        // its note lists the steps taken.
        let steps = journal
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        ctx.event(
            tenant,
            EventType::Normal,
            "Provisioned",
            "Provision",
            format!(
                "schema {} at migration version {} with credentials in Secret {secret_name}{}",
                id.as_str(),
                status
                    .migration_version
                    .map_or("none".into(), |v| v.to_string()),
                if steps.is_empty() {
                    String::new()
                } else {
                    format!(": {steps}")
                }
            ),
        )
        .await;
    } else {
        flush(tenant, &mut journal, ctx).await;
    }
    let verified = Verified {
        generation: tenant.metadata.generation,
        secret_version,
        migration_version: status.migration_version,
        at: Instant::now(),
    };
    write_status(tenant, status, ctx).await?;
    if let Some(uid) = tenant.uid() {
        ctx.verified
            .lock()
            .expect("verified lock")
            .insert(uid, verified);
    }
    match held_back {
        Some("RolloutPending") => return Ok(Action::requeue(Duration::from_secs(5))),
        Some(_) => return Ok(Action::requeue(Duration::from_secs(60))),
        None => {}
    }
    // Periodic resync catches drift nobody told us about (a role altered by hand).
    Ok(Action::requeue(Duration::from_secs(3600)))
}

/// When `tenant` was fully verified recently and nothing it depends on changed since (spec
/// generation, its Secret, the migration set, its status), the time left until a full check
/// is due again.
pub(super) fn recently_verified(
    tenant: &Tenant,
    b: &StatusBuilder,
    secret_name: &str,
    ctx: &Context,
) -> Option<Duration> {
    let status = tenant.status.as_ref()?;
    if status.phase != Phase::Ready || status.observed_generation != tenant.metadata.generation {
        return None;
    }
    // The routing condition computed just now must match what the status says.
    let routable_now = b.clone().build();
    let now_cond = routable_now
        .conditions
        .iter()
        .find(|c| c.type_ == condition::ROUTABLE);
    let then_cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::ROUTABLE);
    if now_cond.map(|c| (&c.status, &c.message)) != then_cond.map(|c| (&c.status, &c.message)) {
        return None;
    }
    let verified = ctx
        .verified
        .lock()
        .expect("verified lock")
        .get(&tenant.uid()?)?
        .clone();
    let secret = ctx
        .secrets
        .get(&ObjectRef::new(secret_name).within(tenant.metadata.namespace.as_deref()?))?;
    let fresh = verified.generation == tenant.metadata.generation
        && verified.secret_version.is_some()
        && verified.secret_version == secret.metadata.resource_version
        && verified.migration_version == ctx.migrations.latest()
        && status.migration_version == ctx.migrations.latest();
    let age = verified.at.elapsed();
    (fresh && age < VERIFIED_FOR).then(|| VERIFIED_FOR - age)
}

/// Applies pending migrations; returns the schema's version and the versions applied now.
/// A schema already up to date costs one read and no transaction.
pub(super) async fn migrate(id: &Ident, ctx: &Context) -> Result<Migrated, Error> {
    let applied = ctx
        .admin
        .applied_migrations(id)
        .await
        .map_err(db(Stage::Migrations))?;
    let pending = ctx.migrations.pending(&applied)?;
    let current = applied.iter().map(|(v, _)| *v).max();
    if pending.is_empty() {
        return Ok(Migrated {
            version: current,
            applied: Vec::new(),
            held: None,
        });
    }
    // New tenants get the whole set at once; tenants already migrated once follow the rollout.
    let gated = !applied.is_empty();
    if gated {
        match admit(ctx) {
            Admit::Go => {}
            Admit::Wait(m) => {
                return Ok(Migrated {
                    version: current,
                    applied: Vec::new(),
                    held: Some(("RolloutPending", m)),
                })
            }
            Admit::Halted(m) => {
                return Ok(Migrated {
                    version: current,
                    applied: Vec::new(),
                    held: Some(("RolloutHalted", m)),
                })
            }
        }
    }
    let result = ctx.admin.migrate(id, &ctx.migrations).await;
    if gated {
        if matches!(&result, Err(e) if !e.is_transient()) {
            ctx.migration_failures.fetch_add(1, Ordering::SeqCst);
        }
        ctx.migrating.fetch_sub(1, Ordering::SeqCst);
    }
    let applied_now = result?;
    let version = current.into_iter().chain(applied_now.iter().copied()).max();
    Ok(Migrated {
        version,
        applied: applied_now,
        held: None,
    })
}

/// Outcome of the migration step.
pub(super) struct Migrated {
    version: Option<i64>,
    applied: Vec<i64>,
    /// Pending migrations held back by the rollout: (condition reason, message).
    held: Option<(&'static str, String)>,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn credentials(
    tenant: &Tenant,
    id: &Ident,
    secret_name: &str,
    verifier: Option<&str>,
    fresh_password: Option<&str>,
    b: &mut StatusBuilder,
    journal: &mut Journal,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let ns = tenant.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let endpoint = ctx.admin.endpoint();
    // The watch cache answers the common case (nothing to do) without an apiserver call; any
    // other verdict is confirmed on a live read, because the cache may lag our own writes.
    let cached = ctx
        .secrets
        .get(&ObjectRef::new(secret_name).within(&ns))
        .map(|s| (*s).clone());
    let mut existing = cached;
    let mut decision = secret::decide(
        tenant,
        existing.as_ref(),
        endpoint,
        id,
        verifier,
        fresh_password,
    );
    if decision != Decision::Keep {
        existing = secrets
            .get_opt(secret_name)
            .await
            .map_err(kube_err(Stage::Credentials))?;
        decision = secret::decide(
            tenant,
            existing.as_ref(),
            endpoint,
            id,
            verifier,
            fresh_password,
        );
    }
    let (material, event) = match decision {
        Decision::Keep => {
            b.ok(
                condition::CREDENTIALS_READY,
                "Issued",
                format!("credentials in Secret {secret_name}"),
            );
            return Ok(existing.and_then(|s| s.metadata.resource_version));
        }
        Decision::Conflict { message } => {
            b.fail(
                condition::CREDENTIALS_READY,
                "Conflict",
                message.clone(),
                Phase::Conflict,
            );
            if tenant.status.as_ref().map(|s| s.phase) != Some(Phase::Conflict) {
                ctx.event(
                    tenant,
                    EventType::Warning,
                    "Conflict",
                    "IssueCredentials",
                    message,
                )
                .await;
            }
            return Ok(None);
        }
        Decision::Repair(material) => {
            let what = if existing.is_some() {
                "repaired"
            } else {
                "issued"
            };
            (
                material,
                (
                    if existing.is_some() {
                        "CredentialsRepaired"
                    } else {
                        "CredentialsIssued"
                    },
                    format!("{what} Secret {secret_name}"),
                ),
            )
        }
        Decision::Rotate { reason, jwt_key } => {
            let password = crate::domain::scram::generate_password();
            ctx.admin
                .set_password(id, &password)
                .await
                .map_err(db(Stage::Credentials))?;
            let kind = if existing.is_some() {
                "CredentialsRepaired"
            } else {
                "CredentialsIssued"
            };
            (
                secret::Material { password, jwt_key },
                (
                    kind,
                    format!("{reason}: set a new password and wrote Secret {secret_name}"),
                ),
            )
        }
    };
    let desired = secret::desired(tenant, endpoint, id, &material);
    let written = secrets
        .patch(
            secret_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(kube_err(Stage::Credentials))?;
    journal.push((event.0, event.1));
    b.ok(
        condition::CREDENTIALS_READY,
        "Issued",
        format!("credentials in Secret {secret_name}"),
    );
    Ok(written.metadata.resource_version)
}
