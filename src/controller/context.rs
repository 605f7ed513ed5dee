//! State shared by all reconciles: clients, watch caches, the verified fast-path cache,
//! failure counters, and Event publishing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef},
    },
    Client, Resource, ResourceExt,
};
use tracing::warn;

use super::rollout::RolloutPolicy;
use crate::{
    domain::{
        crd::{condition, Tenant},
        routing,
    },
    postgres::{migrations::MigrationSet, Admin},
    telemetry::Metrics,
};

/// What a full reconcile verified for a Ready tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verified {
    pub(super) generation: Option<i64>,
    pub(super) secret_version: Option<String>,
    pub(super) migration_version: Option<i64>,
    pub(super) at: Instant,
}

/// How long a full verification (database reads, Secret check) is trusted: reconciles
/// triggered by watch events in between cost no database round trip and no apiserver call.
pub(super) const VERIFIED_FOR: Duration = Duration::from_secs(300);

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
    pub(super) rollout: RolloutPolicy,
    /// Tenants being migrated right now (for the canary).
    pub(super) migrating: std::sync::atomic::AtomicUsize,
    /// Tenants whose migration failed since this process started.
    pub(super) migration_failures: std::sync::atomic::AtomicUsize,
    /// Tenants fully verified recently (uid → what was verified), for cheap no-op reconciles.
    pub(super) verified: Mutex<HashMap<String, Verified>>,
    /// Asks the controller to reconcile other Tenants (whose Routable condition a change to
    /// this one makes stale).
    pub(super) retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<Tenant>>,
    /// Consecutive failures per Tenant, for exponential backoff.
    pub(super) failures: Mutex<HashMap<ObjectRef<Tenant>, u32>>,
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
    pub(super) fn retrigger_related(&self, me: &Tenant, gone: bool) {
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

    pub(super) async fn event(
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

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
