//! The servers tenants are placed on: the default server (the operator's `--database-url`) and
//! every `PostgresServer`, each with its own admin pool. The leader looks at every
//! PostgresServer periodically (its admin Secret, reachability, version, database size, the
//! tenants placed on it), prepares a new one like the default server (public schema locked,
//! the gateway role with the gateway's password) and reports it in its status. Placement of
//! new tenants ([`crate::domain::server::pick`]) reads what was last found here.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, RwLock},
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    api::{Patch, PatchParams},
    Api, Client, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    domain::{
        crd::{Condition, Tenant},
        limits::format_bytes,
        routing::Key,
        server::{
            self, Candidate, NoServer, PlacementSpec, PostgresServer, PostgresServerStatus,
            ServerEndpoint, DEFAULT_SECRET_KEY,
        },
    },
    postgres::Admin,
};

/// How often the leader looks at every PostgresServer.
pub const REFRESH: Duration = Duration::from_secs(5);

/// One PostgresServer as last looked at.
#[derive(Clone)]
struct Known {
    /// Set once the admin Secret held a URL and the server was prepared; kept while the
    /// server is unreachable.
    admin: Option<Admin>,
    /// What the admin was made from: the URL, and the host and port given to tenants.
    made_of: Option<(String, Option<String>, Option<u16>)>,
    labels: BTreeMap<String, String>,
    capacity: Option<u32>,
    ready: bool,
}

/// The servers tenants are placed on, and the placements this process made that its Tenant
/// watch does not show yet.
pub struct Servers {
    default_name: String,
    default: Admin,
    /// Where admin Secrets are looked up when `adminSecretRef.namespace` is unset.
    namespace: String,
    gateway_password: Mutex<Option<String>>,
    /// Only the PostgresServers whose labels match (`--server-selector`; empty: all).
    selector: String,
    known: RwLock<BTreeMap<String, Known>>,
    picks: Mutex<HashMap<Key, String>>,
}

impl Servers {
    /// `namespace`: the operator's, where admin Secrets are read.
    pub fn new(default: Admin, default_name: String, namespace: String, selector: String) -> Self {
        Self {
            default_name,
            default,
            namespace,
            selector,
            gateway_password: Mutex::default(),
            known: RwLock::default(),
            picks: Mutex::default(),
        }
    }

    pub fn default_name(&self) -> &str {
        &self.default_name
    }

    pub fn default_admin(&self) -> &Admin {
        &self.default
    }

    /// Gives other servers' gateway roles the default server's gateway password.
    pub fn set_gateway_password(&self, password: Option<String>) {
        *self.gateway_password.lock().expect("servers lock") = password;
    }

    /// The admin of server `name`, if it is registered (reachable or not).
    pub fn admin(&self, name: &str) -> Option<Admin> {
        if name == self.default_name {
            return Some(self.default.clone());
        }
        self.known
            .read()
            .expect("servers lock")
            .get(name)
            .and_then(|k| k.admin.clone())
    }

    /// The server `tenant` lives on: `status.server`, or the default server for a tenant
    /// provisioned before servers were recorded (an upgrade). `None`: not placed yet.
    pub fn server_of(&self, tenant: &Tenant) -> Option<String> {
        let status = tenant.status.as_ref()?;
        status
            .server
            .clone()
            .or_else(|| status.schema.is_some().then(|| self.default_name.clone()))
    }

    /// The admin of the server `tenant` lives on.
    pub fn admin_of(&self, tenant: &Tenant) -> Option<Admin> {
        self.admin(&self.server_of(tenant)?)
    }

    fn candidates(&self, loads: &HashMap<String, usize>) -> Vec<Candidate> {
        let load = |n: &str| loads.get(n).copied().unwrap_or(0) as u32;
        let mut out = vec![Candidate {
            name: self.default_name.clone(),
            labels: BTreeMap::new(),
            capacity: None,
            ready: true,
            tenants: load(&self.default_name),
        }];
        for (name, k) in self.known.read().expect("servers lock").iter() {
            out.push(Candidate {
                name: name.clone(),
                labels: k.labels.clone(),
                capacity: k.capacity,
                ready: k.ready && k.admin.is_some(),
                tenants: load(name),
            });
        }
        out
    }

    /// Whether server `name` still satisfies `placement` (`None`: not registered). Asked by
    /// every reconcile: no copy of the fleet's counts, one read lock at most.
    pub fn satisfies(&self, name: &str, placement: &PlacementSpec) -> Option<bool> {
        if placement.is_default() {
            return Some(true);
        }
        if name == self.default_name {
            return Some(server::satisfies(placement, name, &BTreeMap::new()));
        }
        let known = self.known.read().expect("servers lock");
        known
            .get(name)
            .map(|k| server::satisfies(placement, name, &k.labels))
    }

    /// Picks the server of the new tenant `key` and remembers the pick until the Tenant watch
    /// shows it placed, or gone (`settled`). One pick at a time, the loads read under the same
    /// lock, so that Tenants created together spread.
    pub fn pick(
        &self,
        key: &Key,
        placement: &PlacementSpec,
        loads: impl Fn() -> HashMap<String, usize>,
        settled: impl Fn(&Key) -> bool,
    ) -> Result<String, NoServer> {
        let mut picks = self.picks.lock().expect("servers lock");
        picks.retain(|k, _| !settled(k));
        let mut loads = loads();
        if let Some(name) = picks.get(key) {
            return Ok(name.clone());
        }
        for name in picks.values() {
            *loads.entry(name.clone()).or_default() += 1;
        }
        let name = server::pick(placement, &self.candidates(&loads))?;
        picks.insert(key.clone(), name.clone());
        Ok(name)
    }

    /// Forgets a pick whose status write failed (the next reconcile picks again).
    pub fn unpick(&self, key: &Key) {
        self.picks.lock().expect("servers lock").remove(key);
    }

    /// Looks at every PostgresServer once: registers new ones, follows changed Secrets,
    /// reports each in its status. `loads`: the Tenants placed on each server.
    pub async fn refresh(&self, client: &Client, loads: &HashMap<String, usize>) {
        let api: Api<PostgresServer> = Api::all(client.clone());
        let params = kube::api::ListParams::default().labels(&self.selector);
        let list = match api.list(&params).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot list PostgresServers; keeping the servers known");
                return;
            }
        };
        let mut seen = Vec::new();
        for ps in &list.items {
            let name = ps.name_any();
            seen.push(name.clone());
            let status = self.look_at(client, ps, loads).await;
            if ps.status.as_ref().map(comparable) != Some(comparable(&status))
                || stale(ps.status.as_ref())
            {
                let patch = json!({ "status": status });
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(server = %name, error = %e, "cannot write PostgresServer status");
                }
            }
        }
        // A deleted PostgresServer: tenants still placed on it report it (its admin is gone).
        self.known
            .write()
            .expect("servers lock")
            .retain(|name, _| seen.contains(name));
    }

    async fn look_at(
        &self,
        client: &Client,
        ps: &PostgresServer,
        loads: &HashMap<String, usize>,
    ) -> PostgresServerStatus {
        let name = ps.name_any();
        let previous = ps.status.clone().unwrap_or_default();
        let mut status = PostgresServerStatus {
            observed_generation: ps.metadata.generation,
            tenants: loads.get(&name).copied().unwrap_or(0) as u32,
            checked_at: Some(super::reconcile::now()),
            endpoint: previous.endpoint.clone(),
            ..Default::default()
        };
        let ready = |status: &mut PostgresServerStatus, ok: bool, reason: &str, msg: String| {
            status.conditions = vec![condition(
                &previous,
                ok,
                reason,
                msg,
                ps.metadata.generation,
            )];
        };
        if name == self.default_name {
            ready(
                &mut status,
                false,
                "ReservedName",
                format!(
                    "{name:?} is the operator's own server (--database-url); give this one another name"
                ),
            );
            return status;
        }
        let url = match self.admin_url(client, ps).await {
            Ok(url) => url,
            Err((reason, msg)) => {
                self.set(&name, ps, None, None, false);
                ready(&mut status, false, reason, msg);
                return status;
            }
        };
        let made_of = (url.clone(), ps.spec.host.clone(), ps.spec.port);
        let existing = self
            .known
            .read()
            .expect("servers lock")
            .get(&name)
            .filter(|k| k.made_of.as_ref() == Some(&made_of))
            .and_then(|k| k.admin.clone());
        let fresh = existing.is_none();
        let mut admin = match existing {
            Some(a) => a,
            None => match self
                .default
                // As many connections as the default server's admin: a rollout runs as many
                // migrations at once on each server.
                .sibling(
                    &url,
                    self.default.pool_size(),
                    ps.spec.host.clone(),
                    ps.spec.port,
                ) {
                Ok(a) => a,
                Err(e) => {
                    self.set(&name, ps, None, None, false);
                    ready(
                        &mut status,
                        false,
                        "InvalidSecret",
                        format!("the admin Secret's URL is not a PostgreSQL URL: {e}"),
                    );
                    return status;
                }
            },
        };
        let ep = admin.endpoint();
        status.endpoint = Some(ServerEndpoint {
            host: ep.host.clone(),
            port: ep.port,
            dbname: ep.dbname.clone(),
        });
        // A new admin (a new server, or its Secret, host or port changed) prepares the server
        // first; then each look is one query.
        let looked = match fresh {
            true => self.prepare(&name, &mut admin).await,
            false => admin.describe().await,
        };
        match looked {
            Ok((version, bytes)) => {
                self.set(&name, ps, Some(admin), Some(made_of), true);
                if fresh {
                    info!(server = %name, %version, "PostgreSQL server registered");
                }
                status.reachable = true;
                status.version = Some(version);
                status.bytes_used = Some(bytes);
                status.size = Some(format_bytes(bytes.max(0) as u64));
                let msg = format!("reachable as admin; {} tenant(s) placed", status.tenants);
                ready(&mut status, true, "Reachable", msg);
            }
            Err(e) => {
                // An admin never prepared is not kept (the next look prepares it).
                let keep = (!fresh).then_some(admin);
                let made = keep.as_ref().map(|_| made_of);
                self.set(&name, ps, keep, made, false);
                status.version = previous.version.clone();
                ready(
                    &mut status,
                    false,
                    "Unreachable",
                    format!("cannot reach the server as admin: {e}"),
                );
            }
        }
        status
    }

    /// Prepares a server like the default one (public schema locked, the gateway role with
    /// this server's own password), then reads its version and database size.
    async fn prepare(&self, name: &str, admin: &mut Admin) -> Result<(String, i64), sqlx::Error> {
        admin.bootstrap().await?;
        let password = self.gateway_password.lock().expect("servers lock").clone();
        if let Some(p) = password {
            admin
                .ensure_gateway(&crate::domain::credentials::server_gateway_password(
                    &p, name,
                ))
                .await?;
        }
        admin.describe().await
    }

    /// Records what was found. `admin: None` keeps the admin known (a Secret that turned
    /// unusable, or a server not reachable, leaves its tenants served by the admin they had).
    fn set(
        &self,
        name: &str,
        ps: &PostgresServer,
        admin: Option<Admin>,
        made_of: Option<(String, Option<String>, Option<u16>)>,
        ready: bool,
    ) {
        let mut known = self.known.write().expect("servers lock");
        let entry = known.entry(name.to_string()).or_insert(Known {
            admin: None,
            made_of: None,
            labels: BTreeMap::new(),
            capacity: None,
            ready: false,
        });
        entry.labels = ps.labels().clone();
        entry.capacity = ps.spec.capacity;
        entry.ready = ready;
        if admin.is_some() {
            entry.admin = admin;
            entry.made_of = made_of;
        }
    }

    async fn admin_url(
        &self,
        client: &Client,
        ps: &PostgresServer,
    ) -> Result<String, (&'static str, String)> {
        let r = &ps.spec.admin_secret_ref;
        let ns = self.namespace.clone();
        let key = r.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let secret = match secrets.get_opt(&r.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err((
                    "SecretNotFound",
                    format!("admin Secret {ns}/{} not found", r.name),
                ))
            }
            Err(e) => {
                return Err((
                    "SecretNotFound",
                    format!("cannot read admin Secret {ns}/{}: {e}", r.name),
                ))
            }
        };
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|u| !u.trim().is_empty())
            .ok_or((
                "InvalidSecret",
                format!("admin Secret {ns}/{} has no key {key:?}", r.name),
            ))
    }
}

/// The status without its timestamps, to tell whether it changed.
fn comparable(s: &PostgresServerStatus) -> PostgresServerStatus {
    let mut c = s.clone();
    c.checked_at = None;
    for cond in &mut c.conditions {
        cond.last_transition_time.clear();
    }
    c
}

/// Whether the status was last written over a minute ago (so `checkedAt` stays telling).
fn stale(s: Option<&PostgresServerStatus>) -> bool {
    let Some(at) = s.and_then(|s| s.checked_at.as_deref()) else {
        return true;
    };
    at.parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t)
                .as_secs()
                >= 60
        })
        .unwrap_or(true)
}

fn condition(
    previous: &PostgresServerStatus,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(super::reconcile::now);
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Looks at every PostgresServer every [`REFRESH`] (the leader only).
pub(super) async fn run(ctx: std::sync::Arc<super::Context>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        ctx.servers
            .refresh(&ctx.client, &ctx.fleet.per_server())
            .await;
    }
}
