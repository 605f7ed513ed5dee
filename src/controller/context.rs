//! State shared by all reconciles: clients, the watched fleet and its indexes, the Secret
//! watch cache, the verified fast-path cache, the consecutive-failure counters, the rollout's
//! in-process counters, and Event publishing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    runtime::{
        events::{Event, Recorder, Reporter},
        reflector::{self, ObjectRef},
        watcher,
    },
    Client, Resource, ResourceExt,
};
use tracing::warn;

use super::{
    drift::DriftBook,
    fleet::Fleet,
    reconcile::Note,
    rollout::{Rollout, RolloutPolicy},
    usage::UsageBook,
};
use crate::{
    domain::{
        crd::{condition, Phase, Tenant},
        status::StatusBuilder,
    },
    postgres::migrations::MigrationSet,
    telemetry::Metrics,
};

/// What a full reconcile verified for a Ready tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verified {
    pub generation: Option<i64>,
    /// resourceVersion of the credentials Secret.
    pub secret_version: Option<String>,
    pub migration_version: Option<i64>,
    pub at: Instant,
}

/// How long a full verification (database reads, Secret check) is trusted: reconciles
/// triggered by watch events in between cost no database round trip and no apiserver call.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    /// Every server tenants are placed on, the default one (`--database-url`) included.
    pub servers: super::servers::Servers,
    /// The migration set in force: replaced whole when the source's set changes and is
    /// accepted (see [`super::live`]). Read it once per step with [`Context::migrations`].
    migrations: std::sync::RwLock<Arc<MigrationSet>>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Every Tenant the controller watches, with the indexes kept from its watch (routing
    /// claims, rollout counters), fed by [`Context::apply_watch_event`]: what a reconcile asks
    /// of the fleet costs the same at any fleet size.
    pub(super) fleet: Fleet,
    /// The watch cache of tenantry-managed Secrets.
    pub secrets: reflector::Store<Secret>,
    /// The rollout policy and this process's migrations in flight and failed.
    pub(super) rollout: Rollout,
    /// The platform key every tenant's token signing key is derived from.
    platform_key: Arc<[u8]>,
    /// Tenants fully verified recently (uid → what was verified), for cheap no-op reconciles.
    verified: Mutex<HashMap<String, Verified>>,
    /// Asks the controller to reconcile other Tenants (whose Routable condition a change to
    /// this one makes stale).
    retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<Tenant>>,
    /// Consecutive failures per Tenant, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<Tenant>, u32>>,
    /// The fleet's storage usage as last measured (see [`super::usage`]).
    pub(super) usage: UsageBook,
    /// The fleet's schema drift as last scanned (see [`super::drift`]).
    pub(super) drift: DriftBook,
    /// How long a Ready tenant waits for its next full verification ([`super::Settings::resync`]).
    pub(super) resync: Duration,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        migrations: MigrationSet,
        metrics: Metrics,
        store: reflector::Store<Tenant>,
        secrets: reflector::Store<Secret>,
        retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<Tenant>>,
        rollout: RolloutPolicy,
        base_domain: Option<&str>,
        platform_key: Arc<[u8]>,
        resync: Duration,
        servers: super::servers::Servers,
    ) -> Self {
        let reporter = Reporter {
            controller: "tenantry".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            servers,
            rollout: Rollout::new(rollout, migrations.latest()),
            migrations: std::sync::RwLock::new(Arc::new(migrations)),
            metrics,
            fleet: Fleet::new(store, base_domain),
            secrets,
            platform_key,
            verified: Mutex::default(),
            retrigger,
            failures: Mutex::default(),
            usage: UsageBook::default(),
            drift: DriftBook::default(),
            resync,
        }
    }

    /// The migration set in force.
    pub fn migrations(&self) -> Arc<MigrationSet> {
        self.migrations.read().expect("migrations lock").clone()
    }

    /// Puts an accepted set in force and restarts the rollout's counters for it.
    pub(super) fn replace_migrations(&self, set: MigrationSet) {
        let target = set.latest();
        *self.migrations.write().expect("migrations lock") = Arc::new(set);
        self.rollout.restart(target);
        self.metrics.set_migration_target(target);
    }

    /// `tenants` grouped by the server they live on (placed ones only), each as `key(t)`.
    pub(super) fn by_server<T>(
        &self,
        tenants: &[Arc<Tenant>],
        key: impl Fn(&Tenant) -> T,
    ) -> std::collections::BTreeMap<String, Vec<T>> {
        let mut out: std::collections::BTreeMap<String, Vec<T>> = Default::default();
        for t in tenants {
            if let Some(server) = self.servers.server_of(t) {
                out.entry(server).or_default().push(key(t));
            }
        }
        out
    }

    /// Asks the controller to reconcile `tenant`.
    pub(super) fn wake(&self, tenant: ObjectRef<Tenant>) {
        let _ = self.retrigger.send(tenant);
    }

    /// The token signing key of `tenant`, derived from the platform key and its uid.
    pub(super) fn jwt_key(&self, tenant: &Tenant) -> String {
        crate::domain::credentials::derive_jwt_key(
            &self.platform_key,
            tenant.metadata.uid.as_deref().unwrap_or_default(),
        )
    }

    /// Feeds the fleet's indexes from the Tenant watch (before the reconciles see the event).
    pub fn apply_watch_event(&self, event: &watcher::Event<Tenant>) {
        self.fleet.apply(event);
    }

    /// Why the API would not route to `tenant`: one message per other live Tenant claiming
    /// its name or one of its hosts (the rule of [`crate::domain::routing`]).
    pub(super) fn routing_clashes(&self, tenant: &Tenant) -> Vec<String> {
        self.fleet.clashes(tenant)
    }

    /// Reconciles the other Tenants whose Routable condition no longer matches because of
    /// `me` (`gone` when `me` is being deleted), found by lookup in the routing index.
    pub(super) fn retrigger_related(&self, me: &Tenant, gone: bool) {
        for other in self.fleet.stale_neighbours(me, gone) {
            let _ = self.retrigger.send(other);
        }
    }

    /// Publishes an Event about `tenant` (best effort: a lost Event is logged, not retried).
    pub(super) async fn publish(&self, tenant: &Tenant, note: &Note) {
        let ev = Event {
            type_: note.type_,
            reason: note.reason.into(),
            note: Some(truncate(&note.note, 1000)),
            action: note.action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &tenant.object_ref(&())).await {
            warn!(error = %e, reason = note.reason, "failed to publish event");
        }
    }

    /// Counts one more consecutive failure of `key`; returns how many in a row.
    pub(super) fn count_failure(&self, key: ObjectRef<Tenant>) -> u32 {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub(super) fn clear_failures(&self, key: &ObjectRef<Tenant>) {
        self.failures.lock().expect("failures lock").remove(key);
    }

    pub(super) fn remember_verified(&self, uid: String, verified: Verified) {
        self.verified
            .lock()
            .expect("verified lock")
            .insert(uid, verified);
    }

    /// Whether this process ever found `tenant` Ready (its status as read now may predate that:
    /// the watch brings our own status writes a little after the next reconcile may start).
    pub(super) fn verified_once(&self, tenant: &Tenant) -> bool {
        tenant.uid().is_some_and(|uid| {
            self.verified
                .lock()
                .expect("verified lock")
                .contains_key(&uid)
        })
    }

    /// When `tenant` was fully verified recently and nothing it depends on changed since (spec
    /// generation, its Secret, the migration set, its status), the time left until a full
    /// check is due again. `b` holds the Routable condition computed just now.
    pub(super) fn recently_verified(
        &self,
        tenant: &Tenant,
        b: &StatusBuilder,
        secret_name: &str,
    ) -> Option<Duration> {
        let status = tenant.status.as_ref()?;
        if status.phase != Phase::Ready || status.observed_generation != tenant.metadata.generation
        {
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
        let verified = self
            .verified
            .lock()
            .expect("verified lock")
            .get(&tenant.uid()?)?
            .clone();
        let secret = self
            .secrets
            .get(&ObjectRef::new(secret_name).within(tenant.metadata.namespace.as_deref()?))?;
        let latest = self.migrations().latest();
        let fresh = verified.generation == tenant.metadata.generation
            && verified.secret_version.is_some()
            && verified.secret_version == secret.metadata.resource_version
            && verified.migration_version == latest
            && status.migration_version == latest;
        let age = verified.at.elapsed();
        let trusted = VERIFIED_FOR.min(self.resync);
        (fresh && age < trusted).then(|| trusted - age)
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
