//! One reconcile: the entry point through kube-runtime's finalizer helper, the backoff after
//! errors, and the one report step. Stages return what happened ([`Report`], [`Failure`]);
//! only [`publish`] writes Events and status.

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

use super::{
    cleanup::cleanup,
    context::{Context, Verified},
    error::kube_err,
    provision::apply,
    Error, Stage,
};
use crate::domain::{
    crd::{condition, Phase, Tenant, TenantStatus, FINALIZER, PAUSED_ANNOTATION},
    status::StatusBuilder,
};

/// Field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "tenantry";

/// A role, schema or Secret held by someone else: look again now and then, someone may drop
/// the conflicting object by hand.
pub(super) const REQUEUE_CONFLICT: Duration = Duration::from_secs(300);
/// A migration that failed: fixing it means a new migration set, whose rollout retries it.
pub(super) const REQUEUE_MIGRATION_FAILED: Duration = Duration::from_secs(600);
/// Pending migrations held back while the canary runs.
pub(super) const REQUEUE_ROLLOUT_PENDING: Duration = Duration::from_secs(5);
/// A migration that gave up waiting for a lock on the tenant's tables.
pub(super) const REQUEUE_MIGRATION_LOCKED: Duration = Duration::from_secs(15);
/// Pending migrations held back by a halted rollout.
pub(super) const REQUEUE_ROLLOUT_HALTED: Duration = Duration::from_secs(60);
/// A Ready tenant: the periodic resync catches drift nobody told us about (a role altered by
/// hand, a role, schema or history table dropped out of band); the default of
/// `--resync-secs` ([`super::Settings::resync`]).
pub const RESYNC: Duration = Duration::from_secs(3600);
/// Backoff after an error: this long, doubling per consecutive failure, at most
/// [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// An Event about the Tenant being reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

impl Note {
    pub fn normal(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        debug_assert!(
            super::events::NORMAL.contains(&reason),
            "unlisted Event reason {reason}"
        );
        Self {
            type_: EventType::Normal,
            reason,
            action,
            note: note.into(),
        }
    }

    pub fn warning(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        debug_assert!(
            super::events::WARNING.contains(&reason),
            "unlisted Event reason {reason}"
        );
        Self {
            type_: EventType::Warning,
            reason,
            action,
            note: note.into(),
        }
    }
}

/// Everything one reconcile has to say, written out by [`publish`]: the Events in order, then
/// the status (only when it differs from the Tenant's), then the verdict for the controller.
#[derive(Debug)]
pub(super) struct Report {
    pub events: Vec<Note>,
    /// `None` leaves the status alone (the verified fast path, deletion).
    pub status: Option<TenantStatus>,
    pub verdict: Result<Action, Error>,
    /// Remembered for the fast path once the status is written.
    pub verified: Option<Verified>,
}

impl Report {
    /// Events only; the status stays as it is.
    pub fn events(events: Vec<Note>, verdict: Result<Action, Error>) -> Self {
        Self {
            events,
            status: None,
            verdict,
            verified: None,
        }
    }
}

/// Where a failure shows in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// This step condition False, every later step Unknown, Ready False.
    Step(&'static str),
    /// Ready False only; the step conditions keep what they said (invalid spec, deletion
    /// pending).
    NotReady,
    /// SpecAccepted False; everything else keeps what it said (a refused change to a tenant
    /// that is already provisioned: it keeps serving).
    Refused,
    /// Paused True; everything else keeps what it said (nothing was looked at).
    Paused,
    /// Placed False; everything else keeps what it said (the tenant's server is not known
    /// now: its tenant keeps being served as it was).
    Unplaced,
}

/// What the controller does after a failure.
#[derive(Debug)]
pub(super) enum Then {
    /// Nothing changes until the Tenant does.
    AwaitChange,
    /// Look again after this long.
    Requeue(Duration),
    /// Back off and retry ([`error_policy`]). Boxed: a failure is rare, and small to return.
    Retry(Box<Error>),
}

/// Why a stage stopped the pipeline: what the status says (condition, reason, phase,
/// message), whether it is news worth an Event, and what happens next.
#[derive(Debug)]
pub(super) struct Failure {
    pub mark: Mark,
    pub reason: &'static str,
    pub phase: Phase,
    pub message: String,
    /// When this failure is news: the Warning Event to send, with the message as its note.
    pub event: Option<Warning>,
    pub then: Then,
}

/// The reason and action of a failure's Warning Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Warning {
    pub reason: &'static str,
    pub action: &'static str,
}

impl Failure {
    /// A failed call during `step`: an unreachable database or apiserver is retried as
    /// Provisioning; anything else is Failed. Each occurrence is an Event (backoff spaces them).
    pub fn error(step: &'static str, err: Error) -> Self {
        let (reason, phase) = match &err {
            e if e.is_lock_timeout() => ("LockTimeout", Phase::Provisioning),
            Error::Database { source, .. } if source.is_transient() => {
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
        Self {
            mark: Mark::Step(step),
            reason,
            phase,
            event: Some(Warning {
                reason,
                action: "Provision",
            }),
            message,
            then: Then::Retry(Box::new(err)),
        }
    }

    /// `step` is blocked by an object someone else holds. The Event is sent when the Tenant
    /// enters Conflict, not on every look.
    pub fn conflict(
        step: &'static str,
        action: &'static str,
        message: String,
        previous_phase: Option<Phase>,
    ) -> Self {
        Self {
            mark: Mark::Step(step),
            reason: "Conflict",
            phase: Phase::Conflict,
            event: (previous_phase != Some(Phase::Conflict)).then_some(Warning {
                reason: "Conflict",
                action,
            }),
            message,
            then: Then::Requeue(REQUEUE_CONFLICT),
        }
    }

    /// The report of this failure: `events` (what happened before it), then its own Event,
    /// and the status `b` with the failure marked.
    pub fn report(self, mut b: StatusBuilder, mut events: Vec<Note>) -> Report {
        if let Some(w) = self.event {
            events.push(Note::warning(w.reason, w.action, self.message.clone()));
        }
        match self.mark {
            Mark::Step(step) => b.fail(step, self.reason, self.message, self.phase),
            Mark::NotReady => b.not_ready(self.reason, self.message, self.phase),
            Mark::Refused => b.refuse(self.reason, self.message),
            Mark::Paused => b.pause(self.message),
            Mark::Unplaced => b.unplaced(self.reason, self.message),
        }
        Report {
            events,
            status: Some(b.build()),
            verdict: match self.then {
                Then::AwaitChange => Ok(Action::await_change()),
                Then::Requeue(after) => Ok(Action::requeue(after)),
                Then::Retry(err) => Err(*err),
            },
            verified: None,
        }
    }
}

/// A paused Tenant (the pause annotation): nothing is done, the status says so, and the
/// Normal Event `ReconcilePaused` marks the moment it was paused. Removing the annotation is
/// the change it waits for.
pub(super) fn paused(tenant: &Tenant) -> Option<Report> {
    if !tenant.is_paused() {
        return None;
    }
    let b = StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now());
    let message = format!(
        "reconciliation paused by the annotation {PAUSED_ANNOTATION}=true; remove it to resume"
    );
    let news = tenant.condition(condition::PAUSED).is_none();
    let events = if news {
        vec![Note::normal("ReconcilePaused", "Pause", message.clone())]
    } else {
        Vec::new()
    };
    let failure = Failure {
        mark: Mark::Paused,
        reason: "ReconcilePaused",
        phase: tenant.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        message,
        event: None,
        then: Then::AwaitChange,
    };
    Some(failure.report(b, events))
}

pub(super) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now().to_string())
}

/// Entry point of one reconcile: everything goes through the finalizer helper.
#[instrument(skip(tenant, ctx), fields(tenant = %tenant.name_any(), name = %tenant.name_any(), namespace = tenant.namespace().unwrap_or_default(), schema = tracing::field::Empty))]
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
        ctx.clear_failures(&key);
    }
    result
}

/// One finalizer step as an owned, boxed future (keeps the reconcile future `Send` for any
/// lifetime, which the controller requires): run the stage, then publish its report.
fn step(
    event: FinalizerEvent<Tenant>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action, Error>> {
    async move {
        let (tenant, report) = match event {
            FinalizerEvent::Apply(t) => {
                let report = apply(&t, &ctx).await;
                (t, report)
            }
            FinalizerEvent::Cleanup(t) => {
                let report = cleanup(&t, &ctx).await;
                (t, report)
            }
        };
        publish(&tenant, report, &ctx).await
    }
    .boxed()
}

/// Backoff after an error: 1 s doubling per consecutive failure, at most 5 minutes.
pub fn error_policy(tenant: Arc<Tenant>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.count_failure(ObjectRef::from_obj(&*tenant));
    let delay = (BACKOFF_FIRST * (1u32 << (n - 1).min(8))).min(BACKOFF_MAX);
    warn!(tenant = %tenant.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The one report step: publishes the Events, writes the status once, remembers a fresh
/// verification. A status write that fails turns success into an error (retried); a failure
/// keeps its own error, which is what the backoff is about.
async fn publish(tenant: &Tenant, report: Report, ctx: &Context) -> Result<Action, Error> {
    let Report {
        events,
        status,
        verdict,
        verified,
    } = report;
    for note in &events {
        ctx.publish(tenant, note).await;
    }
    if let Some(status) = status {
        if let Err(e) = write_status(tenant, status, ctx).await {
            if verdict.is_ok() {
                return Err(e);
            }
            warn!(error = %e, "could not record failure in status");
        }
    }
    if let (Some(v), Some(uid)) = (verified, tenant.uid()) {
        ctx.remember_verified(uid, v);
    }
    verdict
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
    let status = serde_json::to_value(status).expect("a status serializes");
    apply_status(tenant, status, FIELD_MANAGER, ctx).await
}

/// Writes `status` (all of it, or some fields) by server-side apply as field manager
/// `manager`.
pub(super) async fn apply_status(
    tenant: &Tenant,
    status: serde_json::Value,
    manager: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<Tenant> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": Tenant::api_version(&()),
        "kind": Tenant::kind(&()),
        "status": status,
    });
    api.patch_status(
        &tenant.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(kube_err(Stage::Status))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::crd::condition;

    fn builder() -> StatusBuilder {
        StatusBuilder::new(None, Some(3), "t".into())
    }

    #[test]
    fn a_step_failure_marks_its_step_and_carries_its_requeue() {
        let f = Failure::conflict(condition::SCHEMA_READY, "Provision", "taken".into(), None);
        let r = f.report(
            builder(),
            vec![Note::normal("RoleCreated", "Provision", "x")],
        );
        let status = r.status.unwrap();
        assert_eq!(status.phase, Phase::Conflict);
        let schema = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::SCHEMA_READY)
            .unwrap();
        assert_eq!(
            (schema.status.as_str(), schema.reason.as_str()),
            ("False", "Conflict")
        );
        let reasons: Vec<_> = r.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["RoleCreated", "Conflict"]);
        assert_eq!(
            r.verdict.unwrap(),
            Action::requeue(REQUEUE_CONFLICT),
            "a conflict is looked at again, not retried hot"
        );
    }

    #[test]
    fn a_conflict_is_news_only_when_entering_it() {
        let f = Failure::conflict(
            condition::ROLE_READY,
            "Provision",
            "m".into(),
            Some(Phase::Conflict),
        );
        assert!(f.event.is_none());
    }

    #[test]
    fn not_ready_keeps_the_steps_and_an_error_is_retried() {
        let err = Error::Kube {
            stage: Stage::Cleanup,
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        let mut f = Failure::error(condition::ROLE_READY, err);
        assert_eq!(
            (f.reason, f.phase),
            ("KubernetesError", Phase::Provisioning)
        );
        f.mark = Mark::NotReady;
        let r = f.report(builder(), Vec::new());
        let status = r.status.unwrap();
        assert_eq!(status.conditions.len(), 1, "only Ready: {status:?}");
        assert!(r.verdict.is_err());
        assert_eq!(r.events[0].type_, EventType::Warning);
    }
}
