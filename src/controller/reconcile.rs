//! One reconcile: the entry point through kube-runtime's finalizer helper, the backoff after
//! errors, and writing status and Events.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{finalizer, Event as FinalizerEvent},
        reflector::ObjectRef,
    },
    Api, Resource, ResourceExt,
};
use serde_json::json;
use tracing::{instrument, warn};

use super::{cleanup::cleanup, context::Context, error::kube_err, provision::apply, Error, Stage};
use crate::domain::{
    crd::{Phase, Tenant, TenantStatus, FINALIZER},
    status::StatusBuilder,
};

/// Field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "tenantry";

pub(super) fn now() -> String {
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
pub(super) fn step(
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
pub(super) async fn write_status(
    tenant: &Tenant,
    status: TenantStatus,
    ctx: &Context,
) -> Result<(), Error> {
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
pub(super) type Journal = Vec<(&'static str, String)>;

pub(super) async fn flush(tenant: &Tenant, journal: &mut Journal, ctx: &Context) {
    for (reason, note) in journal.drain(..) {
        ctx.event(tenant, EventType::Normal, reason, "Provision", note)
            .await;
    }
}

/// Publishes the steps done so far, then records the failure.
pub(super) async fn fail_after(
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
pub(super) async fn fail_with(
    tenant: &Tenant,
    mut b: StatusBuilder,
    step: &str,
    err: Error,
    ctx: &Context,
) -> Result<Action, Error> {
    let (reason, phase) = match &err {
        Error::Database { source, .. } if source.is_transient() => {
            ("DatabaseUnavailable", Phase::Provisioning)
        }
        Error::Kube { .. } => ("KubernetesError", Phase::Provisioning),
        _ => ("DatabaseError", Phase::Failed),
    };
    b.fail(step, reason, err.to_string(), phase);
    ctx.event(
        tenant,
        EventType::Warning,
        reason,
        "Provision",
        err.to_string(),
    )
    .await;
    if let Err(e) = write_status(tenant, b.build(), ctx).await {
        warn!(error = %e, "could not record failure in status");
    }
    Err(err)
}
