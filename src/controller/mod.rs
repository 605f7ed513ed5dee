//! The Tenant reconciler and its runtime: a kube-runtime `Controller` over Tenants (and the
//! Secrets they own), a pipeline per Tenant — validate → role → schema → migrations →
//! credentials → status — behind kube-runtime's finalizer helper, and the health server.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        controller::{Action, Config as ControllerConfig, Controller},
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{finalizer, Event as FinalizerEvent},
        reflector::{self, reflector, ObjectRef},
        watcher::{self, watcher},
        WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde_json::json;
use tracing::{info, instrument, warn, Span};

use crate::{
    domain::{
        crd::{condition, Phase, Tenant, TenantStatus, FINALIZER},
        credentials::{self as secret, Decision},
        naming::Ident,
        plan::{self, Plan},
        routing,
        state::Holder,
        status::StatusBuilder,
    },
    postgres::{
        migrations::{MigrateError, MigrationSet},
        tenant::{Names, SchemaChange},
        Admin,
    },
    telemetry::Metrics,
};

/// Field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "tenantry";

/// A reconcile stage, with the fixed label used in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Role,
    Schema,
    Migrations,
    Credentials,
    Status,
    Cleanup,
    Finalizer,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Role => "role",
            Stage::Schema => "schema",
            Stage::Migrations => "migrations",
            Stage::Credentials => "credentials",
            Stage::Status => "status",
            Stage::Cleanup => "cleanup",
            Stage::Finalizer => "finalizer",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error during {}: {source}", stage.label())]
    Database { stage: Stage, source: sqlx::Error },
    #[error("kubernetes API error during {}: {source}", stage.label())]
    Kube { stage: Stage, source: kube::Error },
    #[error("migrations: {0}")]
    Migration(#[from] crate::postgres::migrations::MigrateError),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A statement gave up waiting for a lock (`lock_timeout`): someone — possibly the tenant
    /// itself — holds a lock this tenant's reconcile needs.
    pub fn is_lock_timeout(&self) -> bool {
        use crate::postgres::migrations::MigrateError;
        let source = match self {
            Error::Database { source, .. } => source,
            Error::Migration(MigrateError::Database(source))
            | Error::Migration(MigrateError::Failed { source, .. }) => source,
            _ => return false,
        };
        matches!(source, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
    }

    /// The stage label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Database { stage, .. } | Error::Kube { stage, .. } => stage.label(),
            Error::Migration(_) => Stage::Migrations.label(),
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => Stage::Finalizer.label(),
            },
        }
    }
}

fn db(stage: Stage) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Database { stage, source }
}

fn kube_err(stage: Stage) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { stage, source }
}

/// What a full reconcile verified for a Ready tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verified {
    generation: Option<i64>,
    secret_version: Option<String>,
    migration_version: Option<i64>,
    at: Instant,
}

/// How long a full verification (database reads, Secret check) is trusted: reconciles
/// triggered by watch events in between cost no database round trip and no apiserver call.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub admin: Admin,
    pub migrations: Arc<MigrationSet>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Every Tenant the controller watches, to spot names and hosts claimed twice.
    pub store: reflector::Store<Tenant>,
    /// The watch cache of tenantry-managed Secrets.
    pub secrets: reflector::Store<Secret>,
    rollout: RolloutPolicy,
    /// Tenants being migrated right now (for the canary).
    migrating: std::sync::atomic::AtomicUsize,
    /// Tenants whose migration failed since this process started.
    migration_failures: std::sync::atomic::AtomicUsize,
    /// Tenants fully verified recently (uid → what was verified), for cheap no-op reconciles.
    verified: Mutex<HashMap<String, Verified>>,
    /// Asks the controller to reconcile other Tenants (whose Routable condition a change to
    /// this one makes stale).
    retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<Tenant>>,
    /// Consecutive failures per Tenant, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<Tenant>, u32>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        admin: Admin,
        migrations: MigrationSet,
        metrics: Metrics,
        store: reflector::Store<Tenant>,
        secrets: reflector::Store<Secret>,
        retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<Tenant>>,
        rollout: RolloutPolicy,
    ) -> Self {
        let reporter = Reporter {
            controller: "tenantry".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            admin,
            migrations: Arc::new(migrations),
            metrics,
            store,
            secrets,
            rollout,
            migrating: Default::default(),
            migration_failures: Default::default(),
            verified: Mutex::default(),
            retrigger,
            failures: Mutex::default(),
        }
    }

    /// Reconciles the other Tenants whose Routable condition no longer matches because of
    /// `me` (`gone` when `me` is being deleted). Only inconsistent ones are triggered, so two
    /// clashing Tenants do not keep waking each other.
    fn retrigger_related(&self, me: &Tenant, gone: bool) {
        let me_ref = format!("{}/{}", me.namespace().unwrap_or_default(), me.name_any());
        for other in self.store.state() {
            if other.metadata.namespace == me.metadata.namespace
                && other.metadata.name == me.metadata.name
            {
                continue;
            }
            let clash = !gone && !routing::clashes_among(&other, [me]).is_empty();
            let cond = other.condition(condition::ROUTABLE);
            let says_clash = cond.is_some_and(|c| c.status == "False");
            let blames_me = cond.is_some_and(|c| c.message.contains(&format!("Tenant {me_ref} ")));
            if (clash && !says_clash) || (!clash && says_clash && blames_me) {
                let _ = self.retrigger.send(ObjectRef::from_obj(&*other));
            }
        }
    }

    async fn event(
        &self,
        tenant: &Tenant,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(&note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &tenant.object_ref(&())).await {
            warn!(error = %e, reason, "failed to publish event");
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now().to_string())
}

/// Entry point of one reconcile: everything goes through the finalizer helper.
#[instrument(skip(tenant, ctx), fields(tenant = %tenant.name_any(), namespace = tenant.namespace().unwrap_or_default(), schema = tracing::field::Empty))]
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = tenant.namespace().unwrap_or_default();
    let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &ns);
    let key = ObjectRef::from_obj(&*tenant);
    let step_ctx = ctx.clone();
    let result = finalizer(&api, FINALIZER, tenant, move |event| step(event, step_ctx))
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.failures.lock().expect("failures lock").remove(&key);
    }
    result
}

/// One finalizer step as an owned, boxed future (keeps the reconcile future `Send` for any
/// lifetime, which the controller requires).
fn step(
    event: FinalizerEvent<Tenant>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action, Error>> {
    async move {
        match event {
            FinalizerEvent::Apply(t) => apply(&t, &ctx).await,
            FinalizerEvent::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    }
    .boxed()
}

/// Backoff after an error: 1 s doubling per consecutive failure, at most 5 minutes.
pub fn error_policy(tenant: Arc<Tenant>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(ObjectRef::from_obj(&*tenant)).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300));
    warn!(tenant = %tenant.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Writes `status` if it differs from what the Tenant has.
async fn write_status(tenant: &Tenant, status: TenantStatus, ctx: &Context) -> Result<(), Error> {
    let key = format!(
        "{}/{}",
        tenant.namespace().unwrap_or_default(),
        tenant.name_any()
    );
    ctx.metrics
        .set_phase(key, Some((status.phase, status.migration_version)));
    if tenant.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<Tenant> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": Tenant::api_version(&()),
        "kind": Tenant::kind(&()),
        "status": status,
    });
    api.patch_status(
        &tenant.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(kube_err(Stage::Status))?;
    Ok(())
}

/// Steps taken in this reconcile, as (Event reason, note): published as one `Provisioned`
/// Event on first provisioning, or one Event each otherwise.
type Journal = Vec<(&'static str, String)>;

async fn flush(tenant: &Tenant, journal: &mut Journal, ctx: &Context) {
    for (reason, note) in journal.drain(..) {
        ctx.event(tenant, EventType::Normal, reason, "Provision", note)
            .await;
    }
}

/// Publishes the steps done so far, then records the failure.
async fn fail_after(
    journal: &mut Journal,
    tenant: &Tenant,
    b: StatusBuilder,
    step: &str,
    err: Error,
    ctx: &Context,
) -> Result<Action, Error> {
    flush(tenant, journal, ctx).await;
    fail_with(tenant, b, step, err, ctx).await
}

/// Records a failure in status (best effort) and returns the error for backoff.
async fn fail_with(
    tenant: &Tenant,
    mut b: StatusBuilder,
    step: &str,
    err: Error,
    ctx: &Context,
) -> Result<Action, Error> {
    let (reason, phase) = match &err {
        e if e.is_lock_timeout() => ("LockTimeout", Phase::Provisioning),
        Error::Database { source, .. } if crate::postgres::is_transient(source) => {
            ("DatabaseUnavailable", Phase::Provisioning)
        }
        Error::Kube { .. } => ("KubernetesError", Phase::Provisioning),
        _ => ("DatabaseError", Phase::Failed),
    };
    let message = if reason == "LockTimeout" {
        format!(
            "gave up waiting for a lock another session holds on this tenant; will retry: {err}"
        )
    } else {
        err.to_string()
    };
    b.fail(step, reason, message.clone(), phase);
    ctx.event(tenant, EventType::Warning, reason, "Provision", message)
        .await;
    if let Err(e) = write_status(tenant, b.build(), ctx).await {
        warn!(error = %e, "could not record failure in status");
    }
    Err(err)
}

/// Provisions a Tenant: the pipeline of steps, each reported as a condition.
async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
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
    let names = Names::new(id.clone());
    let observed = match ctx.admin.observe_tenant(&names).await {
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
    let owner_holder = observed.owner_role_holder(&owner);
    let schema_holder = observed.schema_holder(&owner);
    for (what, name, step, holder) in [
        ("role", &id, condition::ROLE_READY, &role_holder),
        ("role", &names.owner, condition::ROLE_READY, &owner_holder),
        ("schema", &id, condition::SCHEMA_READY, &schema_holder),
    ] {
        let message = match holder {
            Holder::Unmanaged => format!(
                "{what} {} already exists and is not managed by tenantry; nothing was changed",
                name.as_str()
            ),
            Holder::OtherTenant(o) => format!(
                "{what} {} belongs to Tenant {}/{}; nothing was changed",
                name.as_str(),
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

    // 2. Roles: the owner (never logs in) and the app login.
    let mut fresh_password = None;
    let app_created = observed.role.is_none();
    let password = app_created.then(crate::domain::scram::generate_password);
    if let Err(e) = ctx
        .admin
        .ensure_roles(&names, &owner, &observed, password.as_deref())
        .await
    {
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
    if app_created {
        fresh_password = password;
        journal.push((
            "RoleCreated",
            format!(
                "created role {} (owner {})",
                id.as_str(),
                names.owner.as_str()
            ),
        ));
        b.ok(
            condition::ROLE_READY,
            "Created",
            format!("role {} created", id.as_str()),
        );
    } else {
        b.ok(
            condition::ROLE_READY,
            "Exists",
            format!("role {} exists", id.as_str()),
        );
    }

    // 3. Schema, owned by the owner role, used by the app role, closed to everyone else.
    match ctx.admin.ensure_schema(&names, &owner, &observed).await {
        Err(e) => {
            return fail_after(
                &mut journal,
                tenant,
                b,
                condition::SCHEMA_READY,
                db(Stage::Schema)(e),
                ctx,
            )
            .await
        }
        Ok(SchemaChange::Created) => {
            journal.push((
                "SchemaCreated",
                format!(
                    "created schema {} owned by role {}",
                    id.as_str(),
                    names.owner.as_str()
                ),
            ));
            b.ok(
                condition::SCHEMA_READY,
                "Created",
                format!("schema {} created", id.as_str()),
            );
        }
        Ok(change) => {
            if let SchemaChange::Converted { untrusted } = &change {
                let list = if untrusted.is_empty() {
                    "none found".to_string()
                } else {
                    untrusted.join(", ")
                };
                ctx.event(
                    tenant,
                    EventType::Warning,
                    "OwnershipConverted",
                    "Provision",
                    format!(
                        "schema {} now belongs to role {}; role {} keeps read/write access only. \
                         Functions, triggers, views, rules and policies created before the \
                         conversion may have been planted with the tenant credentials and now \
                         run as the owner — review them: {list}",
                        id.as_str(),
                        names.owner.as_str(),
                        id.as_str()
                    ),
                )
                .await;
            }
            b.ok(
                condition::SCHEMA_READY,
                "Exists",
                format!("schema {} exists", id.as_str()),
            );
        }
    }
    {
        let s = b.status_mut();
        s.schema = Some(id.as_str().to_string());
        s.role = Some(id.as_str().to_string());
        s.owner_role = Some(names.owner.as_str().to_string());
    }

    // 4. Migrations, as the tenant role, inside the schema.
    let mut held_back = None;
    match migrate(&names, ctx).await {
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
        Err(Error::Migration(MigrateError::UntrustedHistory { message })) => {
            b.fail(
                condition::MIGRATIONS_APPLIED,
                "UntrustedHistory",
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
                    "UntrustedHistory",
                    "Migrate",
                    message,
                )
                .await;
            }
            flush(tenant, &mut journal, ctx).await;
            write_status(tenant, b.build(), ctx).await?;
            return Ok(Action::requeue(Duration::from_secs(600)));
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
fn recently_verified(
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
async fn migrate(names: &Names, ctx: &Context) -> Result<Migrated, Error> {
    let applied = ctx.admin.applied_migrations(names).await?;
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
    let result = ctx.admin.migrate(names, &ctx.migrations).await;
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
struct Migrated {
    version: Option<i64>,
    applied: Vec<i64>,
    /// Pending migrations held back by the rollout: (condition reason, message).
    held: Option<(&'static str, String)>,
}

#[allow(clippy::too_many_arguments)]
async fn credentials(
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

/// Deletion according to `deletionPolicy`. Never reports success before the database work is
/// done; copes with a Tenant that was never provisioned.
async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
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

async fn cleanup_database(tenant: &Tenant, id: &Ident, ctx: &Context) -> Result<(), Error> {
    let owner = crate::domain::state::Owner::new(
        &tenant.namespace().unwrap_or_default(),
        &tenant.name_any(),
        tenant.metadata.uid.as_deref().unwrap_or_default(),
    );
    let names = Names::new(id.clone());
    let observed = ctx
        .admin
        .observe_tenant(&names)
        .await
        .map_err(db(Stage::Cleanup))?;
    let role_ours = observed.role_holder(&owner) == Holder::ThisTenant;
    let owner_ours = observed.owner_role_holder(&owner) == Holder::ThisTenant;
    let schema_ours = observed.schema_holder(&owner) == Holder::ThisTenant;
    match tenant.spec.deletion_policy {
        crate::domain::crd::DeletionPolicy::Retain => {
            if role_ours {
                ctx.admin
                    .retain_tenant(&names)
                    .await
                    .map_err(db(Stage::Cleanup))?;
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
            if role_ours || owner_ours || schema_ours {
                ctx.admin
                    .drop_tenant_roles(&names, schema_ours, role_ours, owner_ours)
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

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Settings of `tenantry controller`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch Tenants in this namespace only (all namespaces when `None`).
    pub namespace: Option<String>,
    pub concurrency: u16,
    pub health_addr: SocketAddr,
    /// Where the gateway role's credentials are kept (namespace, name), when the admin has a
    /// gateway role.
    pub gateway_secret: Option<(String, String)>,
    /// Leader election; `None` runs as the only replica.
    pub leader: Option<crate::leader::LeaseConfig>,
    /// How a new migration set rolls out over tenants that are already provisioned.
    pub rollout: RolloutPolicy,
}

/// Rollout control for a new migration set across existing tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutPolicy {
    /// Migrate this many tenants first; the rest wait until they are all at the new version.
    /// 0: no canary.
    pub canary: usize,
    /// Stop migrating once this many tenants failed the new set. 0: never stop.
    pub max_failures: usize,
}

/// What the rollout lets one tenant do now.
enum Admit {
    Go,
    Wait(String),
    Halted(String),
}

/// Decides, from the Tenants in the watch cache (so it survives restarts) and from this
/// process's own in-flight and failed migrations (which the cache may not show yet), whether a
/// tenant may migrate now. `Go` reserves an in-flight slot the caller must release.
fn admit(ctx: &Context) -> Admit {
    let target = ctx.migrations.latest();
    let mut total = 0usize;
    let mut done = 0usize;
    let mut failed_seen = 0usize;
    for t in ctx.store.state() {
        total += 1;
        if t.status.as_ref().and_then(|s| s.migration_version) == target {
            done += 1;
        }
        if t.condition(condition::MIGRATIONS_APPLIED)
            .is_some_and(|c| c.reason == "MigrationFailed")
        {
            failed_seen += 1;
        }
    }
    let failed = failed_seen.max(ctx.migration_failures.load(Ordering::SeqCst));
    ctx.metrics
        .rollout(target, total.saturating_sub(done), failed);
    let p = ctx.rollout;
    let version = target.unwrap_or_default();
    if p.max_failures > 0 && failed >= p.max_failures {
        return Admit::Halted(format!(
            "rollout of migration version {version} halted: {failed} tenants failed it (limit {}); fix the migration set and restart the operator",
            p.max_failures
        ));
    }
    loop {
        let in_flight = ctx.migrating.load(Ordering::SeqCst);
        if p.canary > 0 && done < p.canary && done + in_flight + failed >= p.canary {
            return Admit::Wait(if failed > 0 {
                format!("the canary failed: {failed} of {} canary tenants could not reach version {version}", p.canary)
            } else {
                format!(
                    "waiting for the canary: {done} of {} canary tenants at version {version}",
                    p.canary
                )
            });
        }
        if ctx
            .migrating
            .compare_exchange(in_flight, in_flight + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Admit::Go;
        }
    }
}

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

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    mut admin: Admin,
    migrations: MigrationSet,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let tenants: Api<Tenant> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let secrets: Api<Secret> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    if let Err(e) = tenants
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        anyhow::bail!("cannot list Tenants ({e}); is the CRD installed? kubectl apply -f crds/");
    }

    metrics.set_migration_target(migrations.latest());
    let synced = Arc::new(AtomicBool::new(false));
    let standby = Arc::new(AtomicBool::new(settings.leader.is_some()));
    let health = crate::health::serve(
        settings.health_addr,
        metrics.clone(),
        crate::health::Readiness {
            synced: synced.clone(),
            standby: standby.clone(),
        },
        admin.clone(),
    )
    .await?;
    info!(addr = %health, "health and metrics listening");

    // With leader election, wait for the lease; keep renewing it in the background and stop
    // reconciling the moment it is lost.
    let lost_rx = match settings.leader.clone() {
        Some(cfg) => {
            let elector = crate::leader::LeaderElector::new(client.clone(), cfg);
            elector.acquire().await;
            standby.store(false, Ordering::SeqCst);
            let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                elector.keep().await;
                let _ = lost_tx.send(());
            });
            Some(lost_rx)
        }
        None => None,
    };
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    let shutdown = async move {
        let lease_lost = async {
            match lost_rx {
                Some(rx) => rx.await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown => {}
            true = lease_lost => lost_flag.store(true, Ordering::SeqCst),
        }
    };

    // The database may still be starting: keep trying, reporting not-ready meanwhile.
    let mut delay = Duration::from_millis(500);
    loop {
        match admin.bootstrap().await {
            Ok(()) => break,
            Err(e) => {
                warn!(error = %e, "database not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }

    if let Some((ns, name)) = &settings.gateway_secret {
        ensure_gateway(&client, &admin, ns, name).await?;
    }
    // Our own reflector (rather than Controller::new) so readiness can follow the watch:
    // ready once the first full list has landed in the store.
    let (reader, writer) = reflector::store();
    let (retrigger, retriggered) = tokio::sync::mpsc::unbounded_channel();
    let (secret_reader, secret_writer) = reflector::store::<Secret>();
    let secret_stream = reflector(
        secret_writer,
        watcher(
            secrets,
            watcher::Config::default().labels(&secret::managed_selector()),
        )
        .default_backoff(),
    )
    .touched_objects();
    let ctx = Arc::new(Context::new(
        client,
        admin,
        migrations,
        metrics,
        reader.clone(),
        secret_reader,
        retrigger,
        settings.rollout,
    ));
    let tenant_stream = reflector(
        writer,
        watcher(tenants, watcher::Config::default()).default_backoff(),
    )
    .inspect_ok(move |ev| {
        if matches!(ev, watcher::Event::InitDone) && !synced.swap(true, Ordering::SeqCst) {
            info!("initial Tenant sync complete");
        }
    })
    .applied_objects();
    let controller = Controller::for_stream(tenant_stream, reader)
        .reconcile_on(tokio_stream_from(retriggered))
        .owns_stream(secret_stream)
        .with_config(
            ControllerConfig::default()
                .concurrency(settings.concurrency)
                // Our own Secret and status writes arrive as watch events milliseconds apart:
                // one follow-up reconcile instead of one each.
                .debounce(Duration::from_millis(200)),
        )
        .graceful_shutdown_on(shutdown);
    info!(
        namespace = settings.namespace.as_deref().unwrap_or("<all>"),
        migrations = ctx.migrations.latest(),
        "controller started"
    );
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
    if lost.load(Ordering::SeqCst) {
        anyhow::bail!("lost the leader lease; exiting so that this replica restarts as a standby");
    }
    info!("controller stopped");
    Ok(())
}
