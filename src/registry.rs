//! The API's live tenant registry: a watch-fed index of Tenants and the signing keys in their
//! credentials Secrets. One [`RegistryWriter`] (the watch task) feeds it; request handlers
//! hold [`Registry`] readers, which cannot write and never call the apiserver. Names and hosts
//! claimed twice are routable by nobody (the rule lives in [`crate::domain::routing`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::domain::{
    crd::Tenant,
    credentials as creds,
    routing::{Claims, Key, Route, RoutingIndex},
};

/// What the API knows about one Tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    pub namespace: String,
    pub name: String,
    pub display_name: String,
    pub hosts: Vec<String>,
    /// Schema and role (same name); `None` until provisioned.
    pub schema: Option<String>,
    pub ready: bool,
    pub migration_version: Option<i64>,
    pub secret_name: String,
}

impl TenantInfo {
    pub fn from_tenant(t: &Tenant) -> Self {
        let status = t.status.as_ref();
        Self {
            namespace: t.namespace().unwrap_or_default(),
            name: t.name_any(),
            display_name: t.spec.display_name.clone().unwrap_or_else(|| t.name_any()),
            hosts: t
                .spec
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            schema: status.and_then(|s| s.schema.clone()),
            // Ready as last reported, even while a spec edit (a new host, a display name) is
            // being reconciled: the schema cannot change, so serving it stays correct.
            ready: t
                .condition(crate::domain::crd::condition::READY)
                .is_some_and(|c| c.status == "True")
                && t.metadata.deletion_timestamp.is_none(),
            migration_version: status.and_then(|s| s.migration_version),
            secret_name: creds::effective_secret_name(t),
        }
    }
}

/// A routable tenant: its info and its token signing key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub info: Arc<TenantInfo>,
    pub jwt_key: Option<Arc<[u8]>>,
}

/// Result of looking a tenant up.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Entry),
    /// Two or more Tenants claim this name or host.
    Ambiguous(Vec<String>),
    Unknown,
}

#[derive(Default)]
struct Index {
    tenants: HashMap<Key, Arc<TenantInfo>>,
    /// Who claims which name and host: the rule the operator's Routable condition uses.
    routes: RoutingIndex,
    /// (namespace, secret name) → jwt-key bytes.
    keys: HashMap<Key, Arc<[u8]>>,
}

impl Index {
    fn unlink(&mut self, key: &Key) {
        self.tenants.remove(key);
        self.routes.remove(key);
    }

    fn upsert(&mut self, t: &Tenant) {
        let info = TenantInfo::from_tenant(t);
        let key = (info.namespace.clone(), info.name.clone());
        self.routes.set(key.clone(), Claims::of(t));
        if self.tenants.get(&key).is_some_and(|old| **old == info) {
            return;
        }
        self.tenants.insert(key, Arc::new(info));
    }

    fn entry(&self, key: &Key) -> Option<Entry> {
        let info = self.tenants.get(key)?.clone();
        let jwt_key = self
            .keys
            .get(&(info.namespace.clone(), info.secret_name.clone()))
            .cloned();
        Some(Entry { info, jwt_key })
    }

    fn lookup(&self, route: Route<'_>) -> Lookup {
        match route {
            Route::Nobody => Lookup::Unknown,
            Route::One(k) => self.entry(k).map_or(Lookup::Unknown, Lookup::Found),
            Route::Ambiguous(many) => {
                Lookup::Ambiguous(many.iter().map(|(ns, n)| format!("{ns}/{n}")).collect())
            }
        }
    }
}

fn jwt_key_of(s: &Secret) -> Option<Arc<[u8]>> {
    let bytes = &s.data.as_ref()?.get(creds::JWT_KEY)?.0;
    (bytes.len() >= creds::MIN_JWT_KEY_BYTES).then(|| Arc::from(bytes.as_slice()))
}

/// What the readers and the writer share.
#[derive(Default)]
struct Shared {
    index: RwLock<Index>,
    tenants_synced: AtomicBool,
    secrets_synced: AtomicBool,
}

/// Read access to the registry: lookups and sync state, nothing that writes. Cheap to clone;
/// all clones see the one index that its [`RegistryWriter`] feeds.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

/// The registry's only writer. Made once, with its readers, by [`new`]; not `Clone`, so one
/// index has exactly one writer.
pub struct RegistryWriter {
    shared: Arc<Shared>,
    /// Objects of a relist in progress, applied together when it completes.
    tenant_buf: Vec<Tenant>,
    secret_buf: Vec<Secret>,
}

/// An empty registry: the reader handle to share and the one writer to feed it.
pub fn new() -> (Registry, RegistryWriter) {
    let shared = Arc::new(Shared::default());
    let writer = RegistryWriter {
        shared: shared.clone(),
        tenant_buf: Vec::new(),
        secret_buf: Vec::new(),
    };
    (Registry { shared }, writer)
}

/// A registry kept current from the apiserver: watches Tenants and tenantry-managed Secrets
/// (all namespaces, or only `namespace`) on a spawned task, retrying with backoff across
/// apiserver outages and serving the last known state meanwhile. Dropping the handle detaches
/// the task; aborting it stops the watch.
pub fn watch(client: Client, namespace: Option<&str>) -> (Registry, JoinHandle<()>) {
    let (tenants, secrets): (Api<Tenant>, Api<Secret>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (registry, mut writer) = new();
    let task = tokio::spawn(async move { writer.run(changes(tenants, secrets)).await });
    (registry, task)
}

/// One watch event, from either stream.
pub enum Change {
    Tenants(watcher::Event<Tenant>),
    Secrets(watcher::Event<Secret>),
}

/// The merged, retrying watch streams of Tenants and tenantry-managed Secrets.
fn changes(tenants: Api<Tenant>, secrets: Api<Secret>) -> impl Stream<Item = Change> {
    let tenant_events = watcher(tenants, watcher::Config::default())
        .default_backoff()
        .filter_map(|r| async move {
            r.map_err(|e| warn!(error = %e, "tenant watch error; retrying"))
                .ok()
                .map(Change::Tenants)
        });
    let secret_events = watcher(
        secrets,
        watcher::Config::default().labels(&creds::managed_selector()),
    )
    .default_backoff()
    .filter_map(|r| async move {
        r.map_err(|e| warn!(error = %e, "secret watch error; retrying"))
            .ok()
            .map(Change::Secrets)
    });
    futures::stream::select(tenant_events, secret_events)
}

impl Registry {
    /// True once both watches have delivered their first full list.
    pub fn is_synced(&self) -> bool {
        self.shared.tenants_synced.load(Ordering::SeqCst)
            && self.shared.secrets_synced.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.shared
            .index
            .read()
            .expect("registry lock")
            .tenants
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn by_name(&self, name: &str) -> Lookup {
        let idx = self.shared.index.read().expect("registry lock");
        idx.lookup(idx.routes.by_name(name))
    }

    pub fn by_host(&self, host: &str) -> Lookup {
        let idx = self.shared.index.read().expect("registry lock");
        idx.lookup(idx.routes.by_host(&host.to_ascii_lowercase()))
    }
}

impl RegistryWriter {
    /// Applies one watch event.
    pub fn apply(&mut self, change: Change) {
        let shared = &*self.shared;
        let mut idx = shared.index.write().expect("registry lock");
        match change {
            Change::Tenants(ev) => match ev {
                watcher::Event::Apply(t) => idx.upsert(&t),
                watcher::Event::Delete(t) => {
                    idx.unlink(&(t.namespace().unwrap_or_default(), t.name_any()))
                }
                watcher::Event::Init => self.tenant_buf.clear(),
                watcher::Event::InitApply(t) => self.tenant_buf.push(t),
                watcher::Event::InitDone => {
                    // A relist replaces everything: Tenants deleted while disconnected vanish.
                    let keep: std::collections::HashSet<Key> = self
                        .tenant_buf
                        .iter()
                        .map(crate::domain::routing::key)
                        .collect();
                    let stale: Vec<Key> = idx
                        .tenants
                        .keys()
                        .filter(|k| !keep.contains(*k))
                        .cloned()
                        .collect();
                    for k in stale {
                        idx.unlink(&k);
                    }
                    for t in self.tenant_buf.drain(..) {
                        idx.upsert(&t);
                    }
                    if !shared.tenants_synced.swap(true, Ordering::SeqCst) {
                        info!(tenants = idx.tenants.len(), "tenant registry synced");
                    }
                }
            },
            Change::Secrets(ev) => match ev {
                watcher::Event::Apply(s) => {
                    let key = (s.namespace().unwrap_or_default(), s.name_any());
                    match jwt_key_of(&s) {
                        Some(k) => idx.keys.insert(key, k),
                        None => idx.keys.remove(&key),
                    };
                }
                watcher::Event::Delete(s) => {
                    idx.keys
                        .remove(&(s.namespace().unwrap_or_default(), s.name_any()));
                }
                watcher::Event::Init => self.secret_buf.clear(),
                watcher::Event::InitApply(s) => self.secret_buf.push(s),
                watcher::Event::InitDone => {
                    idx.keys = self
                        .secret_buf
                        .drain(..)
                        .filter_map(|s| {
                            Some((
                                (s.namespace().unwrap_or_default(), s.name_any()),
                                jwt_key_of(&s)?,
                            ))
                        })
                        .collect();
                    shared.secrets_synced.store(true, Ordering::SeqCst);
                }
            },
        }
    }

    /// Feeds the registry from a stream of changes until it ends.
    pub async fn run(&mut self, changes: impl Stream<Item = Change>) {
        let mut changes = std::pin::pin!(changes);
        while let Some(change) = changes.next().await {
            self.apply(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::crd::{Condition, TenantStatus};
    use k8s_openapi::ByteString;

    fn ready(name: &str, ns: &str, hosts: &[&str]) -> Tenant {
        let mut t = Tenant::test(name).in_namespace(ns).with_hosts(hosts);
        t.metadata.generation = Some(1);
        t.status = Some(TenantStatus {
            schema: Some(format!("{ns}_{name}")),
            observed_generation: Some(1),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Condition::default()
            }],
            ..TenantStatus::default()
        });
        t
    }

    fn found(l: Lookup) -> Entry {
        match l {
            Lookup::Found(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn indexes_by_name_and_host_and_follows_updates() {
        let (r, mut w) = new();
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &["acme.io"],
        ))));
        assert!(found(r.by_name("acme")).info.ready);
        assert_eq!(found(r.by_host("ACME.io")).info.name, "acme");
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &["new.io"],
        ))));
        assert!(matches!(r.by_host("acme.io"), Lookup::Unknown));
        assert_eq!(found(r.by_host("new.io")).info.name, "acme");
        w.apply(Change::Tenants(watcher::Event::Delete(ready(
            "acme",
            "a",
            &[],
        ))));
        assert!(matches!(r.by_name("acme"), Lookup::Unknown));
        assert!(r.is_empty());
    }

    #[test]
    fn duplicate_names_and_hosts_are_ambiguous_until_resolved() {
        let (r, mut w) = new();
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &["x.io"],
        ))));
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "b",
            &[],
        ))));
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "other",
            "c",
            &["x.io"],
        ))));
        assert!(matches!(r.by_name("acme"), Lookup::Ambiguous(v) if v.len() == 2));
        assert!(matches!(r.by_host("x.io"), Lookup::Ambiguous(_)));
        w.apply(Change::Tenants(watcher::Event::Delete(ready(
            "acme",
            "b",
            &[],
        ))));
        assert_eq!(found(r.by_name("acme")).info.namespace, "a");
    }

    #[test]
    fn relist_drops_tenants_deleted_while_away_and_gates_sync() {
        let (r, mut w) = new();
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "gone",
            "a",
            &[],
        ))));
        w.apply(Change::Tenants(watcher::Event::Init));
        w.apply(Change::Tenants(watcher::Event::InitApply(ready(
            "kept",
            "a",
            &[],
        ))));
        assert!(!r.is_synced());
        w.apply(Change::Tenants(watcher::Event::InitDone));
        w.apply(Change::Secrets(watcher::Event::Init));
        w.apply(Change::Secrets(watcher::Event::InitDone));
        assert!(r.is_synced());
        assert!(matches!(r.by_name("gone"), Lookup::Unknown));
        assert!(matches!(r.by_name("kept"), Lookup::Found(_)));
    }

    #[test]
    fn signing_keys_come_from_the_tenant_secret() {
        let (r, mut w) = new();
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &[],
        ))));
        let mut s = Secret::default();
        s.metadata.name = Some("acme-db".into());
        s.metadata.namespace = Some("a".into());
        s.data = Some([("jwt-key".to_string(), ByteString(vec![b'k'; 40]))].into());
        w.apply(Change::Secrets(watcher::Event::Apply(s.clone())));
        assert_eq!(found(r.by_name("acme")).jwt_key.unwrap().len(), 40);
        s.data = Some([("jwt-key".to_string(), ByteString(vec![b'k'; 8]))].into());
        w.apply(Change::Secrets(watcher::Event::Apply(s)));
        assert!(
            found(r.by_name("acme")).jwt_key.is_none(),
            "short keys are refused"
        );
    }
}
