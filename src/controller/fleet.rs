//! The fleet as the operator sees it, kept from the Tenant watch one event at a time: the names
//! and hosts every Tenant claims (the routing rule's index, as the API registry keeps it), the
//! Tenants that shared a claim with one whose claims changed, and the rollout's counters. Each
//! question a reconcile asks here costs the same with 10 Tenants or 10,000: nothing walks the
//! fleet, and [`Fleet::visited`] counts the Tenants a question looks at so tests can hold it to
//! that.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        RwLock,
    },
};

use kube::runtime::{
    reflector::{ObjectRef, Store},
    watcher,
};

use crate::domain::{
    crd::{condition, Tenant},
    routing::{self, Claims, Key, RoutingIndex},
};

/// Rollout progress toward one target version, over every watched Tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Progress {
    pub total: usize,
    /// At the target version.
    pub done: usize,
    /// Whose MigrationsApplied condition says MigrationFailed.
    pub failed: usize,
}

/// What one Tenant counts for in the rollout, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Standing {
    version: Option<i64>,
    failed: bool,
}

impl Standing {
    fn of(t: &Tenant) -> Self {
        Self {
            version: t.status.as_ref().and_then(|s| s.migration_version),
            failed: t
                .condition(condition::MIGRATIONS_APPLIED)
                .is_some_and(|c| c.reason == "MigrationFailed"),
        }
    }
}

/// One complete view of the fleet, updated one Tenant at a time.
#[derive(Debug, Default)]
struct View {
    routing: RoutingIndex,
    standing: HashMap<Key, Standing>,
    /// How many Tenants stand at each migration version.
    at_version: HashMap<Option<i64>, usize>,
    failed: usize,
    /// For a Tenant whose claims changed since its last reconcile: the Tenants that shared a
    /// claim with it before the change (their Routable condition may still blame it).
    formerly: HashMap<Key, Vec<Key>>,
    /// The server of each placed Tenant, and how many Tenants each server holds.
    placed: HashMap<Key, String>,
    per_server: HashMap<String, usize>,
    /// The Tenants claiming each schema name (its status's, else its spec's or the derived
    /// one): on different servers two could otherwise share one.
    schema_of: HashMap<Key, String>,
    by_schema: HashMap<String, Vec<Key>>,
}

impl View {
    fn empty_like(&self) -> Self {
        Self {
            routing: self.routing.empty_like(),
            ..Self::default()
        }
    }

    fn set(&mut self, t: &Tenant) {
        let key = routing::key(t);
        let claims = Claims::of(t);
        if let Some(old) = self.routing.claims(&key).filter(|old| **old != claims) {
            let before = self.routing.neighbours(&key, old);
            if !before.is_empty() {
                self.formerly.entry(key.clone()).or_default().extend(before);
            }
        }
        self.routing.set(key.clone(), claims);
        let now = Standing::of(t);
        if let Some(old) = self.standing.insert(key.clone(), now) {
            self.uncount(old);
        }
        self.count(now);
        self.unclaim(&key);
        let schema = claimed_schema(t);
        self.by_schema
            .entry(schema.clone())
            .or_default()
            .push(key.clone());
        self.schema_of.insert(key.clone(), schema);
        let server = t.status.as_ref().and_then(|s| s.server.clone());
        self.unplace(&key);
        if let Some(server) = server {
            *self.per_server.entry(server.clone()).or_default() += 1;
            self.placed.insert(key, server);
        }
    }

    fn unclaim(&mut self, key: &Key) {
        if let Some(old) = self.schema_of.remove(key) {
            if let Some(keys) = self.by_schema.get_mut(&old) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_schema.remove(&old);
                }
            }
        }
    }

    fn unplace(&mut self, key: &Key) {
        if let Some(old) = self.placed.remove(key) {
            if let Some(n) = self.per_server.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.per_server.remove(&old);
                }
            }
        }
    }

    fn remove(&mut self, t: &Tenant) {
        let key = routing::key(t);
        self.routing.remove(&key);
        self.formerly.remove(&key);
        self.unplace(&key);
        self.unclaim(&key);
        if let Some(old) = self.standing.remove(&key) {
            self.uncount(old);
        }
    }

    fn count(&mut self, s: Standing) {
        *self.at_version.entry(s.version).or_default() += 1;
        self.failed += usize::from(s.failed);
    }

    fn uncount(&mut self, s: Standing) {
        if let Some(n) = self.at_version.get_mut(&s.version) {
            *n -= 1;
            if *n == 0 {
                self.at_version.remove(&s.version);
            }
        }
        self.failed -= usize::from(s.failed);
    }
}

/// The schema a Tenant has or would get: its status's, else its spec's, else the derived one.
fn claimed_schema(t: &Tenant) -> String {
    use kube::ResourceExt;
    t.status
        .as_ref()
        .and_then(|s| s.schema.clone())
        .or_else(|| t.spec.schema.clone())
        .unwrap_or_else(|| {
            crate::domain::naming::default_schema_name(
                &t.namespace().unwrap_or_default(),
                &t.name_any(),
            )
        })
}

/// The live view and, while the watch relists, the next one. Like the reflector's store, a
/// relist is built aside and swapped in whole once complete, so a restarted watch never shows
/// a half-filled fleet.
#[derive(Debug, Default)]
struct Views {
    live: View,
    relist: Option<View>,
}

/// The watched Tenants and the indexes kept from their watch.
pub(super) struct Fleet {
    /// The watch cache itself: read one Tenant at a time, by key, never as a whole.
    store: Store<Tenant>,
    views: RwLock<Views>,
    /// Tenants looked at by the questions below since start.
    visited: AtomicU64,
}

impl Fleet {
    /// With a base domain, `<name>.<base domain>` belongs to the Tenant called `<name>`.
    pub fn new(store: Store<Tenant>, base_domain: Option<&str>) -> Self {
        Self {
            store,
            views: RwLock::new(Views {
                live: View {
                    routing: RoutingIndex::with_base_domain(base_domain),
                    ..View::default()
                },
                relist: None,
            }),
            visited: AtomicU64::new(0),
        }
    }

    /// Follows the Tenant watch (called with each event before the reconciles see it).
    pub fn apply(&self, event: &watcher::Event<Tenant>) {
        let mut v = self.views.write().expect("fleet lock");
        match event {
            watcher::Event::Apply(t) => v.live.set(t),
            watcher::Event::Delete(t) => v.live.remove(t),
            watcher::Event::Init => v.relist = Some(v.live.empty_like()),
            watcher::Event::InitApply(t) => {
                let empty = v.live.empty_like();
                v.relist.get_or_insert(empty).set(t)
            }
            watcher::Event::InitDone => {
                let empty = v.live.empty_like();
                v.live = v.relist.take().unwrap_or(empty)
            }
        }
    }

    /// The other watched Tenants claiming `schema`, with their servers (if placed).
    pub fn schema_rivals(&self, me: &Key, schema: &str) -> Vec<(Key, Option<String>)> {
        let v = self.views.read().expect("fleet lock");
        v.live
            .by_schema
            .get(schema)
            .into_iter()
            .flatten()
            .filter(|k| *k != me)
            .map(|k| (k.clone(), v.live.placed.get(k).cloned()))
            .collect()
    }

    /// How many watched Tenants each server holds (`status.server`).
    pub fn per_server(&self) -> HashMap<String, usize> {
        self.views
            .read()
            .expect("fleet lock")
            .live
            .per_server
            .clone()
    }

    /// The watched Tenant of `key` (namespace, name).
    pub fn get_key(&self, key: &Key) -> Option<std::sync::Arc<Tenant>> {
        self.get(&ObjectRef::new(&key.1).within(&key.0))
    }

    /// Whether the watch shows `tenant` placed (on any server).
    pub fn placed(&self, tenant: &Key) -> Option<String> {
        self.views
            .read()
            .expect("fleet lock")
            .live
            .placed
            .get(tenant)
            .cloned()
    }

    /// Why the API would not route to `tenant`: one message per other live Tenant claiming its
    /// name or one of its hosts (the rule of [`crate::domain::routing`]).
    pub fn clashes(&self, tenant: &Tenant) -> Vec<String> {
        let (key, claims) = (routing::key(tenant), Claims::of(tenant));
        let v = self.views.read().expect("fleet lock");
        let near = v.live.routing.neighbours(&key, &claims);
        self.visit(near.len());
        if near.is_empty() {
            return Vec::new();
        }
        v.live.routing.clashes(&key, &claims)
    }

    /// The other Tenants whose Routable condition no longer matches because of `me` (`gone`
    /// when `me` is being deleted): those sharing a claim with it now, or before its claims
    /// last changed. Only inconsistent ones are returned, so two clashing Tenants do not keep
    /// waking each other.
    pub fn stale_neighbours(&self, me: &Tenant, gone: bool) -> Vec<ObjectRef<Tenant>> {
        let me_key = routing::key(me);
        let blame = format!("Tenant {}/{} ", me_key.0, me_key.1);
        let mut candidates = {
            let mut v = self.views.write().expect("fleet lock");
            let mut c = v.live.routing.neighbours(&me_key, &Claims::of(me));
            c.extend(v.live.formerly.remove(&me_key).unwrap_or_default());
            c
        };
        candidates.sort();
        candidates.dedup();
        self.visit(candidates.len());
        let v = self.views.read().expect("fleet lock");
        candidates
            .into_iter()
            .filter_map(|(ns, name)| {
                let other = self.store.get(&ObjectRef::new(&name).within(&ns))?;
                let clash = !gone
                    && v.live
                        .routing
                        .clashes(&routing::key(&other), &Claims::of(&other))
                        .iter()
                        .any(|m| m.starts_with(&blame));
                let cond = other.condition(condition::ROUTABLE);
                let says_clash = cond.is_some_and(|c| c.status == "False");
                let blames_me = cond.is_some_and(|c| c.message.contains(&blame));
                ((clash && !says_clash) || (!clash && says_clash && blames_me))
                    .then(|| ObjectRef::from_obj(&*other))
            })
            .collect()
    }

    /// Rollout progress toward `target`, from counters the watch keeps.
    pub fn progress(&self, target: Option<i64>) -> Progress {
        let v = self.views.read().expect("fleet lock");
        Progress {
            total: v.live.standing.len(),
            done: v.live.at_version.get(&target).copied().unwrap_or(0),
            failed: v.live.failed,
        }
    }

    /// The watched Tenant `key` as the watch shows it now.
    pub fn get(&self, key: &ObjectRef<Tenant>) -> Option<std::sync::Arc<Tenant>> {
        self.store.get(key)
    }

    /// The highest migration version any watched Tenant reports.
    pub fn highest_version(&self) -> Option<i64> {
        let v = self.views.read().expect("fleet lock");
        v.live.at_version.keys().copied().max().flatten()
    }

    /// Resolves once the watch's first full list has landed. Polled with a timeout: the
    /// store's readiness wakes only its last waiter, and the controller waits on it too.
    pub async fn ready(&self) {
        while tokio::time::timeout(
            std::time::Duration::from_millis(100),
            self.store.wait_until_ready(),
        )
        .await
        .is_err()
        {}
    }

    /// Every watched Tenant: for the periodic fleet-wide measurements and the rollout only,
    /// never for a reconcile.
    pub fn every_tenant(&self) -> Vec<std::sync::Arc<Tenant>> {
        self.store.state()
    }

    fn visit(&self, n: usize) {
        self.visited.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Tenants looked at by [`Fleet::clashes`], [`Fleet::stale_neighbours`] and
    /// [`Fleet::progress`] since start.
    #[cfg(test)]
    pub fn visited(&self) -> u64 {
        self.visited.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::crd::{Condition, TenantStatus};
    use kube::runtime::reflector::{self, store::Writer};
    use watcher::Event;

    /// A fleet and the store it reads, both fed the same events, as the runtime wires them.
    struct Fixture {
        writer: Writer<Tenant>,
        fleet: Fleet,
    }

    impl Fixture {
        fn new(base_domain: Option<&str>) -> Self {
            let (store, writer) = reflector::store();
            Self {
                writer,
                fleet: Fleet::new(store, base_domain),
            }
        }

        fn send(&mut self, event: Event<Tenant>) {
            self.writer.apply_watcher_event(&event);
            self.fleet.apply(&event);
        }

        fn apply(&mut self, t: &Tenant) {
            self.send(Event::Apply(t.clone()));
        }

        /// `n` unrelated Tenants (own names, own hosts), listed as at start-up.
        fn with_bystanders(mut self, n: usize) -> Self {
            self.send(Event::Init);
            for i in 0..n {
                let t = tenant("ns", &format!("b{i}"), &[&format!("b{i}.io")]).with_status(
                    Some(2),
                    None,
                    None,
                );
                self.send(Event::InitApply(t));
            }
            self.send(Event::InitDone);
            self
        }

        fn stale(&self, me: &Tenant, gone: bool) -> Vec<String> {
            self.fleet
                .stale_neighbours(me, gone)
                .into_iter()
                .map(|r| r.name)
                .collect()
        }
    }

    fn tenant(ns: &str, name: &str, hosts: &[&str]) -> Tenant {
        Tenant::test(name).in_namespace(ns).with_hosts(hosts)
    }

    trait WithStatus {
        fn with_status(
            self,
            version: Option<i64>,
            migration: Option<&str>,
            routable: Option<(&str, &str)>,
        ) -> Self;
    }

    impl WithStatus for Tenant {
        /// A status at migration `version`, with a MigrationsApplied reason and a Routable
        /// (status, message) when given.
        fn with_status(
            mut self,
            version: Option<i64>,
            migration: Option<&str>,
            routable: Option<(&str, &str)>,
        ) -> Self {
            let cond = |type_: &str, status: &str, reason: &str, message: &str| Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                ..Condition::default()
            };
            let mut conditions = Vec::new();
            if let Some(reason) = migration {
                conditions.push(cond(condition::MIGRATIONS_APPLIED, "False", reason, ""));
            }
            if let Some((status, message)) = routable {
                conditions.push(cond(condition::ROUTABLE, status, "x", message));
            }
            self.status = Some(TenantStatus {
                migration_version: version,
                conditions,
                ..TenantStatus::default()
            });
            self
        }
    }

    /// What one reconcile of `me` asks the fleet: its clashes, the neighbours to retrigger
    /// (as on apply and on deletion), and the rollout's progress.
    fn one_reconcile(f: &Fixture, me: &Tenant) -> u64 {
        let before = f.fleet.visited();
        f.fleet.clashes(me);
        f.fleet.stale_neighbours(me, false);
        f.fleet.stale_neighbours(me, true);
        f.fleet.progress(Some(3));
        f.fleet.visited() - before
    }

    #[test]
    fn a_reconcile_looks_at_the_same_tenants_whatever_the_fleet_size() {
        let visits = |n: usize| {
            let mut f = Fixture::new(Some("tenants.test")).with_bystanders(n);
            let me = tenant("ns", "me", &["shop.io"]);
            let partner = tenant("ns", "partner", &["shop.io"]);
            let lonely = tenant("ns", "lonely", &["lonely.io"]);
            for t in [&me, &partner, &lonely] {
                f.apply(t);
            }
            (one_reconcile(&f, &me), one_reconcile(&f, &lonely))
        };
        let small = visits(10);
        let large = visits(10_000);
        assert_eq!(
            small, large,
            "Tenants looked at by one reconcile (clashing, lonely) with 10 vs 10,000 others"
        );
        assert_eq!(small.1, 0, "a Tenant sharing nothing looks at nobody");
    }

    #[test]
    fn clashes_follow_the_domain_rule() {
        let me = tenant("team-a", "acme", &["a.io"]);
        let others = [
            tenant("team-b", "acme", &[]),
            tenant("team-c", "x", &["A.io"]),
            tenant("team-c", "y", &["b.io"]),
            me.clone(),
        ];
        let mut f = Fixture::new(None);
        for t in &others {
            f.apply(t);
        }
        assert_eq!(f.fleet.clashes(&me), routing::clashes_among(&me, &others));
    }

    #[test]
    fn the_index_follows_the_watch_and_relists_whole() {
        let a = tenant("ns", "a", &["x.io"]);
        let b = tenant("ns", "b", &["x.io"]);
        let mut f = Fixture::new(None);
        f.send(Event::Init);
        f.send(Event::InitApply(a.clone()));
        assert!(
            f.fleet.clashes(&b).is_empty(),
            "a relist shows only once complete"
        );
        f.send(Event::InitDone);
        assert_eq!(f.fleet.clashes(&b), ["Tenant ns/a also claims host x.io"]);
        f.apply(&b);
        assert_eq!(f.fleet.clashes(&a), ["Tenant ns/b also claims host x.io"]);
        f.send(Event::Delete(b.clone()));
        assert!(f.fleet.clashes(&a).is_empty());

        // A restarted watch replaces everything: a Tenant deleted meanwhile is gone.
        f.apply(&b);
        f.send(Event::Init);
        f.send(Event::InitApply(a.clone()));
        assert_eq!(f.fleet.clashes(&a), ["Tenant ns/b also claims host x.io"]);
        f.send(Event::InitDone);
        assert!(f.fleet.clashes(&a).is_empty());
        assert_eq!(f.fleet.progress(None).total, 1);
    }

    #[test]
    fn a_new_clash_wakes_the_partner_once() {
        let mut f = Fixture::new(None).with_bystanders(5);
        let first = tenant("ns", "first", &["shop.io"]).with_status(None, None, Some(("True", "")));
        let second = tenant("ns", "second", &["shop.io"]);
        f.apply(&first);
        f.apply(&second);
        assert_eq!(f.stale(&second, false), ["first"]);
        // Once the partner says so, nobody is woken again.
        let told = first.with_status(
            None,
            None,
            Some((
                "False",
                "the API will not route to this tenant: Tenant ns/second also claims host shop.io",
            )),
        );
        f.apply(&told);
        assert!(f.stale(&second, false).is_empty());
        // Deleting the second wakes the first, which blames it.
        assert_eq!(f.stale(&second, true), ["first"]);
    }

    #[test]
    fn a_changed_host_wakes_the_former_partner() {
        let mut f = Fixture::new(None).with_bystanders(5);
        let blamed =
            "the API will not route to this tenant: Tenant ns/mover also claims host shop.io";
        let stays =
            tenant("ns", "stays", &["shop.io"]).with_status(None, None, Some(("False", blamed)));
        let mover = tenant("ns", "mover", &["shop.io"]);
        f.apply(&stays);
        f.apply(&mover);
        assert!(f.stale(&mover, false).is_empty(), "already told");
        let moved = tenant("ns", "mover", &["elsewhere.io"]);
        f.apply(&moved);
        assert_eq!(
            f.stale(&moved, false),
            ["stays"],
            "no longer shares a host, but is still blamed"
        );
        assert!(
            f.stale(&moved, false).is_empty(),
            "the former partner is woken once"
        );
    }

    #[test]
    fn the_base_domain_host_relates_both_ways() {
        let mut f = Fixture::new(Some("tenants.test"));
        let squatter = tenant("a", "acme", &["globex.tenants.test"]).with_status(
            None,
            None,
            Some(("True", "")),
        );
        let globex = tenant("b", "globex", &[]);
        f.apply(&squatter);
        f.apply(&globex);
        assert!(f.fleet.clashes(&globex).is_empty());
        assert_eq!(
            f.stale(&globex, false),
            ["acme"],
            "the squatter loses the host to the Tenant of that name"
        );
    }

    /// A deterministic pseudo-random walk (xorshift): any sequence of watch events leaves the
    /// counters where a recount of the store puts them.
    #[test]
    fn rollout_counters_match_a_recount_after_any_events() {
        let (store, writer) = reflector::store::<Tenant>();
        let mut f = Fixture {
            writer,
            fleet: Fleet::new(store.clone(), None),
        };
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for step in 0..5_000 {
            let name = format!("t{}", next(40));
            let version = [None, Some(1), Some(2), Some(3)][next(4) as usize];
            let reason = [None, Some("MigrationFailed"), Some("RolloutPending")][next(3) as usize];
            let t = tenant("ns", &name, &[]).with_status(version, reason, None);
            let event = match next(20) {
                0..=11 => Event::Apply(t),
                12..=15 => Event::Delete(t),
                16 => Event::Init,
                17..=18 => Event::InitApply(t),
                _ => Event::InitDone,
            };
            f.send(event);
            for target in [None, Some(2), Some(3)] {
                let recount = store.state().iter().fold(Progress::default(), |p, t| {
                    let s = Standing::of(t);
                    Progress {
                        total: p.total + 1,
                        done: p.done + usize::from(s.version == target),
                        failed: p.failed + usize::from(s.failed),
                    }
                });
                assert_eq!(f.fleet.progress(target), recount, "after step {step}");
            }
        }
    }
}
