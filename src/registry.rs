//! The API's live tenant registry: a watch-fed index of Tenants, and the platform signing key
//! each tenant's token key is derived from (so the API reads no tenant's Secret). One
//! [`RegistryWriter`] (the watch task) feeds it; request handlers hold [`Registry`] readers,
//! which cannot write and never call the apiserver. Names and hosts claimed twice are routable
//! by nobody (the rule lives in [`crate::domain::routing`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{runtime::watcher, Api, Client, ResourceExt};
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
    /// `status.server`: the server the tenant lives on (`None`: placed before servers were
    /// recorded, on the default server).
    pub server: Option<String>,
    pub ready: bool,
    pub migration_version: Option<i64>,
    pub secret_name: String,
    /// metadata.uid: the context of the tenant's signing-key derivation.
    pub uid: String,
    /// `spec.api.maxConcurrency`: the tenant's own share of the pool, if set.
    pub max_concurrency: Option<u32>,
    /// `spec.suspended`: refused (423) from the moment the spec says so, before the operator
    /// has acted on it.
    pub suspended: bool,
    /// `spec.limits.statementTimeout` in milliseconds, from the moment the spec says so: the
    /// statement timeout of this tenant's transactions instead of the API's default.
    pub statement_timeout_ms: Option<u64>,
    /// `spec.limits.storage` is set: a write refused by PostgreSQL (42501) is the quota's
    /// doing (the login role has INSERT and UPDATE on every table the API serves otherwise).
    pub has_quota: bool,
    /// The QuotaExceeded condition is True: writes are refused before they reach PostgreSQL.
    pub over_quota: bool,
}

impl TenantInfo {
    pub fn from_tenant(t: &Tenant) -> Self {
        let status = t.status.as_ref();
        Self {
            namespace: t.namespace().unwrap_or_default(),
            name: t.name_any(),
            display_name: t.spec.display_name.clone().unwrap_or_else(|| t.name_any()),
            hosts: Claims::of(t).hosts,
            schema: status.and_then(|s| s.schema.clone()),
            server: status.and_then(|s| s.server.clone()),
            // Ready as last reported, even while a spec edit (a new host, a display name) is
            // being reconciled: the schema cannot change, so serving it stays correct.
            ready: t
                .condition(crate::domain::crd::condition::READY)
                .is_some_and(|c| c.status == "True")
                && t.metadata.deletion_timestamp.is_none(),
            migration_version: status.and_then(|s| s.migration_version),
            secret_name: creds::effective_secret_name(t),
            uid: t.metadata.uid.clone().unwrap_or_default(),
            max_concurrency: t.spec.api.max_concurrency.filter(|n| *n > 0),
            suspended: t.spec.suspended,
            // The operator refuses a spec whose limits do not parse; the API then keeps its
            // own default.
            statement_timeout_ms: t
                .spec
                .limits
                .statement_timeout
                .as_deref()
                .and_then(|d| crate::domain::limits::parse_duration_ms(d).ok()),
            has_quota: t.spec.limits.storage.is_some(),
            over_quota: t.is_over_quota(),
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
    /// The platform signing key, once read.
    platform_key: Option<Arc<[u8]>>,
    /// Each tenant's token key, derived from the platform key and its uid (HKDF, two HMACs)
    /// when either changes rather than on every request.
    jwt_keys: HashMap<Key, Arc<[u8]>>,
}

impl Index {
    fn unlink(&mut self, key: &Key) {
        self.tenants.remove(key);
        self.routes.remove(key);
        self.jwt_keys.remove(key);
    }

    fn upsert(&mut self, t: &Tenant) {
        let info = TenantInfo::from_tenant(t);
        let key = (info.namespace.clone(), info.name.clone());
        self.routes.set(key.clone(), Claims::of(t));
        if self.tenants.get(&key).is_some_and(|old| **old == info) {
            return;
        }
        self.derive_key(&key, &info);
        self.tenants.insert(key, Arc::new(info));
    }

    fn derive_key(&mut self, key: &Key, info: &TenantInfo) {
        match (&self.platform_key, info.uid.is_empty()) {
            (Some(pk), false) => {
                let k = creds::derive_jwt_key(pk, &info.uid);
                self.jwt_keys.insert(key.clone(), Arc::from(k.as_bytes()));
            }
            _ => {
                self.jwt_keys.remove(key);
            }
        }
    }

    /// A new platform key applies to every tenant at once.
    fn set_platform_key(&mut self, k: &[u8]) {
        self.platform_key = Some(Arc::from(k));
        let tenants: Vec<(Key, Arc<TenantInfo>)> = self
            .tenants
            .iter()
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        for (key, info) in tenants {
            self.derive_key(&key, &info);
        }
    }

    fn entry(&self, key: &Key) -> Option<Entry> {
        let info = self.tenants.get(key)?.clone();
        let jwt_key = self.jwt_keys.get(key).cloned();
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

/// What the readers and the writer share.
#[derive(Default)]
struct Shared {
    index: RwLock<Index>,
    tenants_synced: AtomicBool,
    key_loaded: AtomicBool,
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
}

/// An empty registry in which `<name>.<base_domain>` routes to the Tenant called `<name>`: the
/// reader handle to share and the one writer to feed it.
pub fn new(base_domain: Option<&str>) -> (Registry, RegistryWriter) {
    let shared = Arc::new(Shared {
        index: RwLock::new(Index {
            routes: RoutingIndex::with_base_domain(base_domain),
            ..Index::default()
        }),
        ..Shared::default()
    });
    let writer = RegistryWriter {
        shared: shared.clone(),
        tenant_buf: Vec::new(),
    };
    (Registry { shared }, writer)
}

/// Where the registry finds what it serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch Tenants of these namespaces only (all namespaces when empty).
    pub namespaces: Vec<String>,
    /// `<name>.<base domain>` routes to the Tenant called `<name>`.
    pub base_domain: Option<String>,
    /// The Secret (namespace, name) holding the platform signing key under
    /// [`creds::PLATFORM_KEY`].
    pub signing_key: (String, String),
}

/// How often the platform signing key is read again (a rotated key applies within this).
const KEY_REFRESH: Duration = Duration::from_secs(30);
/// How soon a failed or empty read is retried before the first key arrives.
const KEY_RETRY: Duration = Duration::from_secs(2);

/// A registry kept current from the apiserver: watches Tenants (all namespaces, or only
/// `config.namespaces`) and reads the platform signing key, on a spawned task, retrying with
/// backoff across apiserver outages and serving the last known state meanwhile. Dropping the
/// handle detaches the task; aborting it stops the watch.
pub fn watch(client: Client, config: &Config) -> (Registry, JoinHandle<()>) {
    let tenants = crate::watch::namespaces::<Tenant>(
        client.clone(),
        &config.namespaces,
        watcher::Config::default(),
    );
    let (ns, name) = config.signing_key.clone();
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let (registry, mut writer) = new(config.base_domain.as_deref());
    let task = tokio::spawn(async move { writer.run(changes(tenants, secrets, name)).await });
    (registry, task)
}

/// One change the registry follows. Each is moved once through the stream, so the size of a
/// Tenant event is not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Tenants(watcher::Event<Tenant>),
    /// The platform signing key as read now.
    SigningKey(Vec<u8>),
}

/// The retrying Tenant watch merged with periodic reads of the signing-key Secret.
fn changes(
    tenants: impl Stream<Item = watcher::Result<watcher::Event<Tenant>>>,
    secrets: Api<Secret>,
    name: String,
) -> impl Stream<Item = Change> {
    let tenant_events = tenants.filter_map(|r| async move {
        r.map_err(|e| warn!(error = %e, "tenant watch error; retrying"))
            .ok()
            .map(Change::Tenants)
    });
    let key_reads = futures::stream::unfold(
        (secrets, name, false),
        |(secrets, name, loaded)| async move {
            loop {
                let key = match secrets.get_opt(&name).await {
                    Ok(Some(s)) => s
                        .data
                        .and_then(|mut d| d.remove(creds::PLATFORM_KEY))
                        .map(|b| b.0)
                        .filter(|k| k.len() >= creds::MIN_PLATFORM_KEY_BYTES),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(error = %e, secret = %name, "cannot read the signing key; retrying");
                        None
                    }
                };
                match key {
                    Some(k) => {
                        let next = (secrets, name, true);
                        // The first key is delivered at once, later ones after each refresh.
                        if loaded {
                            tokio::time::sleep(KEY_REFRESH).await;
                        }
                        return Some((Change::SigningKey(k), next));
                    }
                    None => {
                        if !loaded {
                            info!(secret = %name, "waiting for the signing key Secret");
                        }
                        tokio::time::sleep(if loaded { KEY_REFRESH } else { KEY_RETRY }).await;
                    }
                }
            }
        },
    );
    futures::stream::select(tenant_events, key_reads)
}

impl Registry {
    /// True once the Tenant watch has delivered its first full list and the signing key has
    /// been read.
    pub fn is_synced(&self) -> bool {
        self.shared.tenants_synced.load(Ordering::SeqCst)
            && self.shared.key_loaded.load(Ordering::SeqCst)
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
            Change::SigningKey(k) => {
                if idx.platform_key.as_deref() != Some(k.as_slice()) {
                    if idx.platform_key.is_some() {
                        info!("signing key changed; tenant token keys follow");
                    }
                    idx.set_platform_key(&k);
                }
                shared.key_loaded.store(true, Ordering::SeqCst);
            }
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
    fn suspension_follows_the_spec_before_the_status() {
        let (r, mut w) = new(None);
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &[],
        ))));
        assert!(!found(r.by_name("acme")).info.suspended);
        // Still Ready in status (the operator has not acted yet): suspended all the same.
        let mut t = ready("acme", "a", &[]);
        t.spec.suspended = true;
        w.apply(Change::Tenants(watcher::Event::Apply(t)));
        assert!(found(r.by_name("acme")).info.suspended);
    }

    #[test]
    fn limits_follow_the_spec_and_the_quota_follows_the_condition() {
        let (r, mut w) = new(None);
        let mut t = ready("acme", "a", &[]);
        t.spec.limits.statement_timeout = Some("2s".into());
        t.spec.limits.storage = Some("1Mi".into());
        w.apply(Change::Tenants(watcher::Event::Apply(t.clone())));
        let info = found(r.by_name("acme")).info;
        assert_eq!(info.statement_timeout_ms, Some(2000));
        assert!(info.has_quota && !info.over_quota);
        t.status.as_mut().unwrap().conditions.push(Condition {
            type_: "QuotaExceeded".into(),
            status: "True".into(),
            ..Condition::default()
        });
        w.apply(Change::Tenants(watcher::Event::Apply(t)));
        assert!(found(r.by_name("acme")).info.over_quota);
    }

    #[test]
    fn indexes_by_name_and_host_and_follows_updates() {
        let (r, mut w) = new(None);
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
        let (r, mut w) = new(None);
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
        let (r, mut w) = new(None);
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
        assert!(!r.is_synced(), "synced before the signing key arrived");
        w.apply(Change::SigningKey(vec![b'p'; 32]));
        assert!(r.is_synced());
        assert!(matches!(r.by_name("gone"), Lookup::Unknown));
        assert!(matches!(r.by_name("kept"), Lookup::Found(_)));
    }

    #[test]
    fn signing_keys_are_derived_from_the_platform_key_and_the_uid() {
        let (r, mut w) = new(None);
        let mut t = ready("acme", "a", &[]);
        t.metadata.uid = Some("uid-1".into());
        w.apply(Change::Tenants(watcher::Event::Apply(t)));
        assert!(
            found(r.by_name("acme")).jwt_key.is_none(),
            "no key before the platform key"
        );
        w.apply(Change::SigningKey(vec![b'p'; 32]));
        let key = found(r.by_name("acme")).jwt_key.unwrap();
        assert_eq!(
            &*key,
            creds::derive_jwt_key(&[b'p'; 32], "uid-1").as_bytes()
        );
        w.apply(Change::SigningKey(vec![b'q'; 32]));
        assert_ne!(found(r.by_name("acme")).jwt_key.unwrap(), key);
    }

    #[test]
    fn base_domain_hosts_route_to_the_tenant_of_that_name() {
        let (r, mut w) = new(Some("tenants.test"));
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "acme",
            "a",
            &["globex.tenants.test"],
        ))));
        w.apply(Change::Tenants(watcher::Event::Apply(ready(
            "globex",
            "b",
            &[],
        ))));
        assert_eq!(found(r.by_host("globex.tenants.test")).info.name, "globex");
        assert_eq!(found(r.by_host("Acme.Tenants.Test")).info.name, "acme");
    }
}
