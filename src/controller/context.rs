//! State shared by all reconciles: clients and watch caches, the verified fast-path cache,
//! the consecutive-failure counters, the rollout's in-process counters, and Event publishing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
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
    reconcile::Note,
    rollout::{Rollout, RolloutPolicy},
};
use crate::{
    domain::{
        crd::{condition, Phase, Tenant},
        routing::{self, Claims, RoutingIndex},
        status::StatusBuilder,
    },
    postgres::{migrations::MigrationSet, Admin},
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
    pub admin: Admin,
    pub migrations: Arc<MigrationSet>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Every Tenant the controller watches (rollout progress, Tenants to retrigger).
    pub store: reflector::Store<Tenant>,
    /// The watch cache of tenantry-managed Secrets.
    pub secrets: reflector::Store<Secret>,
    /// The rollout policy and this process's migrations in flight and failed.
    pub(super) rollout: Rollout,
    /// Names and hosts claimed by every watched Tenant, fed by the Tenant watch
    /// ([`Context::apply_watch_event`]): the Routable condition costs the same at any fleet size.
    routing: RwLock<Routing>,
    /// The platform key every tenant's token signing key is derived from.
    platform_key: Arc<[u8]>,
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
        base_domain: Option<&str>,
        platform_key: Arc<[u8]>,
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
            rollout: Rollout::new(rollout),
            routing: RwLock::new(Routing {
                live: RoutingIndex::with_base_domain(base_domain),
                relist: None,
            }),
            platform_key,
            verified: Mutex::default(),
            retrigger,
            failures: Mutex::default(),
        }
    }

    /// The token signing key of `tenant`, derived from the platform key and its uid.
    pub(super) fn jwt_key(&self, tenant: &Tenant) -> String {
        crate::domain::credentials::derive_jwt_key(
            &self.platform_key,
            tenant.metadata.uid.as_deref().unwrap_or_default(),
        )
    }

    /// Feeds the routing index from the Tenant watch (before the reconciles see the event).
    pub fn apply_watch_event(&self, event: &watcher::Event<Tenant>) {
        self.routing.write().expect("routing lock").apply(event);
    }

    /// Why the API would not route to `tenant`: one message per other live Tenant claiming
    /// its name or one of its hosts (the rule of [`crate::domain::routing`]).
    pub(super) fn routing_clashes(&self, tenant: &Tenant) -> Vec<String> {
        self.routing
            .read()
            .expect("routing lock")
            .live
            .clashes(&routing::key(tenant), &Claims::of(tenant))
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
            let clash = !gone
                && self
                    .routing
                    .read()
                    .expect("routing lock")
                    .live
                    .clashes(&routing::key(&other), &Claims::of(&other))
                    .iter()
                    .any(|m| m.starts_with(&format!("Tenant {me_ref} ")));
            let cond = other.condition(condition::ROUTABLE);
            let says_clash = cond.is_some_and(|c| c.status == "False");
            let blames_me = cond.is_some_and(|c| c.message.contains(&format!("Tenant {me_ref} ")));
            if (clash && !says_clash) || (!clash && says_clash && blames_me) {
                let _ = self.retrigger.send(ObjectRef::from_obj(&*other));
            }
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
        let fresh = verified.generation == tenant.metadata.generation
            && verified.secret_version.is_some()
            && verified.secret_version == secret.metadata.resource_version
            && verified.migration_version == self.migrations.latest()
            && status.migration_version == self.migrations.latest();
        let age = verified.at.elapsed();
        (fresh && age < VERIFIED_FOR).then(|| VERIFIED_FOR - age)
    }
}

/// The routing index, kept the way the reflector keeps its store: a relist is built aside and
/// swapped in whole once complete, so a restarted watch never shows a half-filled index.
#[derive(Debug, Default)]
struct Routing {
    live: RoutingIndex,
    relist: Option<RoutingIndex>,
}

impl Routing {
    fn apply(&mut self, event: &watcher::Event<Tenant>) {
        match event {
            watcher::Event::Apply(t) => self.live.set(routing::key(t), Claims::of(t)),
            watcher::Event::Delete(t) => self.live.remove(&routing::key(t)),
            watcher::Event::Init => self.relist = Some(self.live.empty_like()),
            watcher::Event::InitApply(t) => {
                let empty = self.live.empty_like();
                self.relist
                    .get_or_insert(empty)
                    .set(routing::key(t), Claims::of(t))
            }
            watcher::Event::InitDone => {
                let empty = self.live.empty_like();
                self.live = self.relist.take().unwrap_or(empty)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    fn clashes(r: &Routing, t: &Tenant) -> Vec<String> {
        r.live.clashes(&routing::key(t), &Claims::of(t))
    }

    #[test]
    fn the_routing_index_follows_the_watch() {
        let a = Tenant::test("a").in_namespace("ns").with_hosts(&["x.io"]);
        let b = Tenant::test("b").in_namespace("ns").with_hosts(&["x.io"]);
        let mut r = Routing::default();
        r.apply(&Event::Init);
        r.apply(&Event::InitApply(a.clone()));
        assert!(
            clashes(&r, &b).is_empty(),
            "a relist shows only once complete"
        );
        r.apply(&Event::InitDone);
        assert_eq!(clashes(&r, &b), ["Tenant ns/a also claims host x.io"]);
        r.apply(&Event::Apply(b.clone()));
        assert_eq!(clashes(&r, &a), ["Tenant ns/b also claims host x.io"]);
        r.apply(&Event::Delete(b.clone()));
        assert!(clashes(&r, &a).is_empty());

        // A restarted watch replaces everything: a Tenant deleted meanwhile is gone.
        r.apply(&Event::Apply(b.clone()));
        r.apply(&Event::Init);
        r.apply(&Event::InitApply(a.clone()));
        assert_eq!(clashes(&r, &a), ["Tenant ns/b also claims host x.io"]);
        r.apply(&Event::InitDone);
        assert!(clashes(&r, &a).is_empty());
    }

    #[test]
    fn same_verdict_as_the_domain_rule() {
        let me = Tenant::test("acme")
            .in_namespace("team-a")
            .with_hosts(&["a.io"]);
        let others = [
            Tenant::test("acme").in_namespace("team-b"),
            Tenant::test("x")
                .in_namespace("team-c")
                .with_hosts(&["A.io"]),
            Tenant::test("y")
                .in_namespace("team-c")
                .with_hosts(&["b.io"]),
            me.clone(),
        ];
        let mut r = Routing::default();
        for t in &others {
            r.apply(&Event::Apply(t.clone()));
        }
        assert_eq!(clashes(&r, &me), routing::clashes_among(&me, &others));
    }
}
