//! One watch over a set of namespaces: a watcher per namespace (what namespaced Roles allow),
//! merged into one event stream that reads like a single watch. Its first full list covers
//! every namespace, so a reflector, the operator's routing index and the API's registry turn
//! ready once all of them listed; a later relist of one namespace becomes `Apply`/`Delete`
//! events for that namespace alone, so it never drops the others' objects.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures::{stream, Stream, StreamExt};
use k8s_openapi::{api::core::v1::Secret, NamespaceResourceScope};
use kube::{
    api::ObjectMeta,
    runtime::{
        utils::Backoff,
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;

use crate::domain::crd::{Tenant, TenantSpec};

/// An object that stands for one deleted while a namespace's watch was disconnected: only its
/// namespace and name are known, which is all a reflector or an index needs to remove it.
pub trait Tombstone: Resource + Sized {
    fn tombstone(namespace: &str, name: &str) -> Self;
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..ObjectMeta::default()
    }
}

impl Tombstone for Tenant {
    fn tombstone(namespace: &str, name: &str) -> Self {
        let mut t = Tenant::new(name, TenantSpec::default());
        t.metadata = meta(namespace, name);
        t
    }
}

impl Tombstone for Secret {
    fn tombstone(namespace: &str, name: &str) -> Self {
        Secret {
            metadata: meta(namespace, name),
            ..Secret::default()
        }
    }
}

/// The annotation `kubectl apply` keeps a copy of the whole last-applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what nobody here reads and what costs the most memory per object in a store of
/// thousands: `managedFields` (a JSON tree per field manager) and `kubectl apply`'s copy of the
/// object. Everything the operator and the API read stays.
fn slim<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// The longest a watch waits before retrying after an error. kube-runtime's default backoff
/// grows to 30 s, and it also applies to the relist after `410 Expired`, which is how every
/// watch resumes after an apiserver restart: the failures while the apiserver was down have
/// grown the backoff by then, so Tenants created after its return stayed unseen by the
/// operator and unroutable in the API for up to half a minute. One list per namespace every
/// 5 s at most costs a recovering apiserver little.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How a watch retries: 500 ms after an error, doubling per consecutive error up to
/// [`WATCH_BACKOFF_MAX`], each wait shortened by up to a quarter at random so that many
/// watches do not retry in step; back to 500 ms once the watch delivers again.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next.mul_f64(1.0 - rand::random::<f64>() / 4.0);
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(wait)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Watches `K` in `namespaces` (all namespaces when empty), each watcher retrying with
/// [`WatchBackoff`].
pub fn namespaces<K>(
    client: Client,
    namespaces: &[String],
    config: watcher::Config,
) -> stream::BoxStream<'static, watcher::Result<Event<K>>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Tombstone
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    // A namespace named twice would be watched twice, and its relists would disagree.
    let mut namespaces = namespaces.to_vec();
    namespaces.sort();
    namespaces.dedup();
    match namespaces.as_slice() {
        [] => watcher(Api::<K>::all(client), config)
            .backoff(WatchBackoff::new())
            .modify(slim)
            .boxed(),
        [ns] => watcher(Api::<K>::namespaced(client, ns), config)
            .backoff(WatchBackoff::new())
            .modify(slim)
            .boxed(),
        many => {
            let each = many.iter().enumerate().map(|(i, ns)| {
                watcher(Api::<K>::namespaced(client.clone(), ns), config.clone())
                    .backoff(WatchBackoff::new())
                    .modify(slim)
                    .map(move |r| (i, r))
                    .boxed()
            });
            merged(many.to_vec(), stream::select_all(each)).boxed()
        }
    }
}

/// The events of several namespace watches (tagged with the namespace's index) as one watch.
fn merged<K: Tombstone + Clone + Send + 'static>(
    namespaces: Vec<String>,
    events: impl Stream<Item = (usize, watcher::Result<Event<K>>)> + Send + 'static,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send + 'static {
    let mut merge = Merge::new(namespaces);
    events.flat_map(move |(i, r)| {
        stream::iter(match r {
            Ok(ev) => merge.apply(i, ev).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        })
    })
}

/// The state that turns per-namespace events into one watch's events (pure).
struct Merge<K> {
    namespaces: Vec<String>,
    /// Until every namespace has listed once: each one's objects so far, and whether it
    /// finished its list. Delivered together as the one initial list.
    initial: Option<Vec<(HashMap<String, K>, bool)>>,
    /// After that: the names present per namespace, as told downstream.
    known: Vec<HashSet<String>>,
    /// A namespace's relist in progress.
    relist: Vec<Option<Vec<K>>>,
}

impl<K: Tombstone + Clone> Merge<K> {
    fn new(namespaces: Vec<String>) -> Self {
        let n = namespaces.len();
        Self {
            namespaces,
            initial: Some((0..n).map(|_| (HashMap::new(), false)).collect()),
            known: vec![HashSet::new(); n],
            relist: (0..n).map(|_| None).collect(),
        }
    }

    /// The events downstream for event `ev` of namespace `i`.
    fn apply(&mut self, i: usize, ev: Event<K>) -> Vec<Event<K>> {
        if let Some(initial) = &mut self.initial {
            let (objects, listed) = &mut initial[i];
            match ev {
                Event::Init => {
                    objects.clear();
                    *listed = false;
                }
                Event::InitApply(k) | Event::Apply(k) => {
                    objects.insert(k.name_any(), k);
                }
                Event::Delete(k) => {
                    objects.remove(&k.name_any());
                }
                Event::InitDone => *listed = true,
            }
            if !initial.iter().all(|(_, listed)| *listed) {
                return Vec::new();
            }
            let initial = self.initial.take().unwrap_or_default();
            let mut out = vec![Event::Init];
            for (i, (objects, _)) in initial.into_iter().enumerate() {
                self.known[i] = objects.keys().cloned().collect();
                out.extend(objects.into_values().map(Event::InitApply));
            }
            out.push(Event::InitDone);
            return out;
        }
        match ev {
            Event::Apply(k) => {
                self.known[i].insert(k.name_any());
                vec![Event::Apply(k)]
            }
            Event::Delete(k) => {
                self.known[i].remove(&k.name_any());
                vec![Event::Delete(k)]
            }
            Event::Init => {
                self.relist[i] = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(k) => {
                self.relist[i].get_or_insert_with(Vec::new).push(k);
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relist[i].take().unwrap_or_default();
                let names: HashSet<String> = listed.iter().map(ResourceExt::name_any).collect();
                let ns = &self.namespaces[i];
                let mut out: Vec<Event<K>> = self.known[i]
                    .difference(&names)
                    .map(|gone| Event::Delete(K::tombstone(ns, gone)))
                    .collect();
                out.extend(listed.into_iter().map(Event::Apply));
                self.known[i] = names;
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_retry_within_five_seconds_and_start_over_once_they_deliver() {
        let mut b = WatchBackoff::new();
        let waits: Vec<Duration> = (0..10).map(|_| b.next().unwrap()).collect();
        assert!(waits[0] <= Duration::from_millis(500), "{waits:?}");
        assert!(waits[0] >= Duration::from_millis(375), "{waits:?}");
        assert!(waits[1] >= Duration::from_millis(750), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= WATCH_BACKOFF_MAX), "{waits:?}");
        assert!(waits[9] >= WATCH_BACKOFF_MAX.mul_f64(0.75), "{waits:?}");
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(500));
    }

    #[test]
    fn stored_objects_lose_managed_fields_and_the_last_applied_copy_only() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
        let mut tenant = t("ns", "acme");
        tenant.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            ..ManagedFieldsEntry::default()
        }]);
        tenant.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_string(), "{\"spec\":{}}".to_string()),
                ("tenantry.dev/paused".to_string(), "true".to_string()),
            ]
            .into(),
        );
        slim(&mut tenant);
        assert_eq!(tenant.metadata.managed_fields, None);
        assert_eq!(
            tenant.annotations().keys().collect::<Vec<_>>(),
            ["tenantry.dev/paused"]
        );
    }

    fn t(ns: &str, name: &str) -> Tenant {
        Tenant::test(name).in_namespace(ns)
    }

    fn shape(events: &[Event<Tenant>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Init => "Init".into(),
                Event::InitDone => "InitDone".into(),
                Event::InitApply(k) => {
                    format!("InitApply {}/{}", k.namespace().unwrap(), k.name_any())
                }
                Event::Apply(k) => format!("Apply {}/{}", k.namespace().unwrap(), k.name_any()),
                Event::Delete(k) => format!("Delete {}/{}", k.namespace().unwrap(), k.name_any()),
            })
            .collect()
    }

    #[test]
    fn first_list_waits_for_every_namespace() {
        let mut m = Merge::new(vec!["a".into(), "b".into()]);
        assert!(m.apply(0, Event::Init).is_empty());
        assert!(m.apply(0, Event::InitApply(t("a", "x"))).is_empty());
        assert!(m.apply(0, Event::InitDone).is_empty());
        // Namespace a changes while b is still listing: folded into the first list.
        assert!(m.apply(0, Event::Apply(t("a", "y"))).is_empty());
        assert!(m.apply(1, Event::Init).is_empty());
        assert!(m.apply(1, Event::InitApply(t("b", "z"))).is_empty());
        assert!(m.apply(0, Event::Delete(t("a", "x"))).is_empty());
        let mut out = shape(&m.apply(1, Event::InitDone));
        out[1..3].sort();
        assert_eq!(out, ["Init", "InitApply a/y", "InitApply b/z", "InitDone"]);
        assert_eq!(shape(&m.apply(1, Event::Apply(t("b", "w")))), ["Apply b/w"]);
    }

    #[test]
    fn a_later_relist_touches_its_namespace_only() {
        let mut m = Merge::new(vec!["a".into(), "b".into()]);
        for (i, ns) in [(0, "a"), (1, "b")] {
            m.apply(i, Event::Init);
            m.apply(i, Event::InitApply(t(ns, "keep")));
            m.apply(i, Event::InitApply(t(ns, "gone")));
            m.apply(i, Event::InitDone);
        }
        // Namespace b reconnects: "gone" was deleted meanwhile, "new" created.
        assert!(m.apply(1, Event::Init).is_empty());
        assert!(m.apply(1, Event::InitApply(t("b", "keep"))).is_empty());
        assert!(m.apply(1, Event::InitApply(t("b", "new"))).is_empty());
        assert_eq!(
            shape(&m.apply(1, Event::InitDone)),
            ["Delete b/gone", "Apply b/keep", "Apply b/new"]
        );
        // Namespace a's objects were never touched, and a later delete in b is passed on.
        assert_eq!(
            shape(&m.apply(1, Event::Delete(t("b", "new")))),
            ["Delete b/new"]
        );
        assert!(m.known[0].contains("gone") && !m.known[1].contains("new"));
    }
}
