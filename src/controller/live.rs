//! Live migration sets and their rollout.
//!
//! The operator watches its migration source — a ConfigMap through the apiserver, or a
//! directory it polls — and, when the set changes, judges it before anything runs: a set that
//! cannot be read, that the lint refuses, or that changes or removes a migration some tenant
//! already applied is refused fleet-wide (the previous set keeps running, the TenantRollout
//! says why, a Warning Event is published). An accepted set replaces the current one and
//! starts a rollout.
//!
//! The rollout runs the pending migrations of every provisioned Tenant over the admin pool,
//! through the same admission as a reconcile ([`super::rollout::Rollout::admit`]: the canary
//! first, a halt after too many failures), and reports progress on the one TenantRollout
//! object, at most once a second. Its critical path writes nothing per tenant: each Tenant's
//! `status.migrationVersion` catches up afterwards, when the migrated Tenants are reconciled
//! (a schema already at the target version costs that reconcile one read). Transient failures
//! (a lock held by the tenant's own transaction past the lock timeout, a lost connection) are
//! retried with backoff while the rest of the fleet goes on.

use std::{
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{stream::FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Patch, PatchParams, PostParams},
    runtime::{
        events::{Event, EventType},
        reflector::ObjectRef,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{
    context::Context,
    reconcile::{now, FIELD_MANAGER},
    rollout::{Admission, Hold},
};
use crate::{
    domain::{
        crd::{condition as tenant_condition, Condition, Phase, Tenant},
        naming::Ident,
        rollout::{
            condition, RefusedSet, RolloutCanary, RolloutFailure, RolloutMigration, RolloutTenants,
            TenantRollout, TenantRolloutSpec, TenantRolloutStatus,
        },
    },
    postgres::{migrations::MigrationSet, tenant::Names},
};

/// Where the operator's migration set comes from, watched for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `*.sql` files of a directory (a mounted ConfigMap, a volume), polled.
    Dir(PathBuf),
    /// The `*.sql` keys of a ConfigMap, watched through the apiserver.
    ConfigMap { namespace: String, name: String },
}

/// The migration source: where, whether the built-in demo set comes first, and how often a
/// directory is polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSource {
    pub kind: SourceKind,
    pub demo: bool,
    pub poll: Duration,
}

impl MigrationSource {
    /// How the TenantRollout names the source.
    pub fn describe(&self) -> String {
        let base = match &self.kind {
            SourceKind::Dir(d) => format!("directory {}", d.display()),
            SourceKind::ConfigMap { namespace, name } => format!("ConfigMap {namespace}/{name}"),
        };
        if self.demo {
            format!("{base} + demo set")
        } else {
            base
        }
    }

    /// Reads the set now (the operator's start, and `tenantry migrations plan`).
    pub async fn load(&self, client: &Client) -> anyhow::Result<MigrationSet> {
        match &self.kind {
            SourceKind::Dir(dir) => Ok(compose(self.demo, MigrationSet::from_dir(dir)?)?),
            SourceKind::ConfigMap { namespace, name } => {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                let cm = api.get_opt(name).await?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "the migrations ConfigMap {namespace}/{name} does not exist (create it, or point --migrations-configmap at the right one)"
                    )
                })?;
                Ok(compose(self.demo, from_config_map(&cm)?)?)
            }
        }
    }
}

/// The demo set first when asked for, then the source's.
fn compose(
    demo: bool,
    set: MigrationSet,
) -> Result<MigrationSet, crate::postgres::migrations::LoadError> {
    if demo {
        MigrationSet::embedded().then(set)
    } else {
        Ok(set)
    }
}

/// The `*.sql` keys of a ConfigMap as a set (other keys are ignored, like other files of a
/// directory).
fn from_config_map(cm: &ConfigMap) -> Result<MigrationSet, crate::postgres::migrations::LoadError> {
    MigrationSet::from_files(
        cm.data
            .iter()
            .flatten()
            .filter(|(k, _)| k.ends_with(".sql"))
            .map(|(k, v)| (k.clone(), v.clone())),
    )
}

/// SHA-256 over every migration's version, name and checksum (first 16 hex digits).
pub fn digest(set: &MigrationSet) -> String {
    let mut h = Sha256::new();
    for m in set.migrations() {
        h.update(m.version.to_be_bytes());
        h.update(m.description.as_bytes());
        h.update([0]);
        h.update(&m.checksum);
    }
    hex(&h.finalize()[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the source holds now: a set, or why there is none.
#[derive(Debug)]
enum Candidate {
    Set(MigrationSet),
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Why a set is refused, before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// The fleet-wide judgement of a new set against the current one: every migration up to
/// `applied_up_to` (the highest version any tenant reached) must be in the new set, unchanged.
/// Migrations above it were applied nowhere and may be fixed in place — which is how a halted
/// rollout is repaired.
pub(super) fn judge(
    current: &MigrationSet,
    new: &MigrationSet,
    applied_up_to: Option<i64>,
    lint: &[String],
) -> Result<(), Refusal> {
    if let Some(top) = applied_up_to {
        for m in current.migrations().iter().filter(|m| m.version <= top) {
            match new.migrations().iter().find(|n| n.version == m.version) {
                None => {
                    return Err(Refusal {
                        reason: "MigrationRemoved",
                        message: format!(
                            "migration {} ({}) is missing from the new set, but tenants already applied it (the fleet is at version {top}); restore it",
                            m.version, m.description
                        ),
                    })
                }
                Some(n) if n.checksum != m.checksum => {
                    return Err(Refusal {
                        reason: "ChecksumChanged",
                        message: format!(
                            "migration {} ({}) was changed after tenants applied it (checksum {} → {}); restore the original file and add a new migration instead",
                            m.version,
                            m.description,
                            hex(&m.checksum[..8]),
                            hex(&n.checksum[..8])
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    if let Some(top) = applied_up_to {
        let known = |v: i64| current.migrations().iter().any(|m| m.version == v);
        if let Some(m) = new
            .migrations()
            .iter()
            .find(|m| m.version <= top && !known(m.version))
        {
            return Err(Refusal {
                reason: "MigrationOutOfOrder",
                message: format!(
                    "migration {} ({}) is numbered below version {top}, which tenants already reached: it would run after later migrations on them but in order on new tenants; number it above {top}",
                    m.version, m.description
                ),
            });
        }
    }
    if !lint.is_empty() {
        return Err(Refusal {
            reason: "LintFailed",
            message: format!(
                "the migration lint refused {} statement(s): {}",
                lint.len(),
                lint.join("; ")
            ),
        });
    }
    Ok(())
}

/// The lint's findings on `set`, as lines `file:line: rule: message`.
fn lint(set: &MigrationSet) -> Vec<String> {
    crate::postgres::lint::lint(set)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// A tenant the rollout migrates.
#[derive(Debug, Clone)]
struct Target {
    tenant: ObjectRef<Tenant>,
    label: String,
    names: Names,
}

/// Whether `t` is one of the rollout's tenants: provisioned (Ready, or failed at its
/// migrations), not suspended, paused or being deleted.
fn counts(t: &Tenant) -> bool {
    let Some(status) = t.status.as_ref() else {
        return false;
    };
    let provisioned = status.phase == Phase::Ready
        || t.condition(tenant_condition::MIGRATIONS_APPLIED)
            .is_some_and(|c| c.reason == "MigrationFailed");
    provisioned
        && status.schema.is_some()
        && t.metadata.deletion_timestamp.is_none()
        && !t.is_suspended()
        && !t.is_paused()
}

fn label(t: &Tenant) -> String {
    format!("{}/{}", t.namespace().unwrap_or_default(), t.name_any())
}

/// Whether the rollout migrates `t`: one of its tenants, below `target`.
fn target_of(t: &Tenant, target: Option<i64>) -> Option<Target> {
    let status = t.status.as_ref()?;
    if !counts(t) || status.migration_version >= target {
        return None;
    }
    let schema = status.schema.as_deref()?;
    let names = Names::new(Ident::parse("schema", schema).ok()?);
    Some(Target {
        tenant: ObjectRef::from_obj(t),
        label: label(t),
        names,
    })
}

/// The rollout's tenants as the watch shows them now: how many, and which are at the target.
#[derive(Debug, Default)]
struct Census {
    total: u64,
    at_target: HashSet<String>,
}

fn census(ctx: &Context, target: Option<i64>) -> Census {
    let mut c = Census::default();
    for t in ctx.fleet.every_tenant().iter().filter(|t| counts(t)) {
        c.total += 1;
        if t.status.as_ref().and_then(|s| s.migration_version) >= target {
            c.at_target.insert(label(t));
        }
    }
    c
}

/// Attempts of a tenant that keeps failing transiently (its own lock, typically) before the
/// rollout leaves it to its own reconcile, which keeps retrying: the rollout then finishes
/// without it and completes once its status shows the target.
const ROLLOUT_ATTEMPTS: u32 = 5;

/// Backoff before retry `attempt` (1-based) of a transient failure: 1 s doubling to 30 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Failed,
    Halted,
    /// Every tenant was tried; some keep failing transiently and were left to their own
    /// reconciles.
    Waiting,
    /// A new set replaced this one.
    Superseded,
}

/// The rollout's report, published on the TenantRollout.
#[derive(Debug, Default)]
struct Report {
    source: String,
    digest: String,
    migrations: Vec<RolloutMigration>,
    target: Option<i64>,
    completed: Option<i64>,
    total: u64,
    done: u64,
    failed: BTreeMap<String, String>,
    retrying: BTreeMap<String, String>,
    canary: Option<(u64, &'static str)>,
    halted: Option<String>,
    /// Held by the canary right now.
    waiting: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    end: Option<End>,
    refused: Option<RefusedSet>,
}

impl Report {
    /// While idle: the counts follow the fleet; tenants now at the target leave the failure
    /// lists; a rollout whose last tenants caught up through their own reconciles completes.
    fn follow(&mut self, c: Census) {
        if self.end == Some(End::Halted) {
            return;
        }
        self.total = c.total;
        self.done = c.at_target.len() as u64;
        self.failed.retain(|t, _| !c.at_target.contains(t));
        self.retrying.retain(|t, _| !c.at_target.contains(t));
        if matches!(self.end, Some(End::Failed | End::Waiting))
            && self.failed.is_empty()
            && self.retrying.is_empty()
            && self.done == self.total
        {
            self.end = Some(End::Complete);
            self.completed = self.target;
            self.finished_at = Some(now());
        }
    }

    fn status(&self) -> TenantRolloutStatus {
        let pending = self
            .total
            .saturating_sub(self.done)
            .saturating_sub(self.failed.len() as u64);
        let (phase, message) = match (self.end, &self.halted) {
            (_, Some(why)) => ("Halted", why.clone()),
            (Some(End::Complete), _) => (
                "Complete",
                format!(
                    "all {} provisioned tenants at migration version {}",
                    self.total,
                    version(self.target)
                ),
            ),
            (Some(End::Failed), _) => (
                "Failed",
                format!(
                    "{} tenants failed migration version {}; {} reached it (fix the set: a new set starts a new rollout)",
                    self.failed.len(),
                    version(self.target),
                    self.done
                ),
            ),
            _ if self.waiting.is_some() => ("Waiting", self.waiting.clone().unwrap_or_default()),
            _ if !self.retrying.is_empty() && pending == self.retrying.len() as u64 => (
                "Waiting",
                format!(
                    "{} tenants retrying after a transient failure (see failures)",
                    self.retrying.len()
                ),
            ),
            _ => (
                "Progressing",
                format!(
                    "migrating to version {}: {} of {} done",
                    version(self.target),
                    self.done,
                    self.total
                ),
            ),
        };
        let at = now();
        let cond = |type_: &str, ok: bool, reason: &str, message: String| Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            last_transition_time: at.clone(),
            observed_generation: None,
        };
        let mut conditions = vec![
            cond(
                condition::COMPLETE,
                self.end == Some(End::Complete),
                phase,
                message.clone(),
            ),
            cond(
                condition::HALTED,
                self.halted.is_some(),
                if self.halted.is_some() {
                    "TooManyFailures"
                } else {
                    "NotHalted"
                },
                self.halted.clone().unwrap_or_else(|| "not halted".into()),
            ),
        ];
        conditions.push(match &self.refused {
            Some(r) => cond(condition::SET_ACCEPTED, false, &r.reason, r.message.clone()),
            None => cond(
                condition::SET_ACCEPTED,
                true,
                "Accepted",
                format!("set {} accepted", self.digest),
            ),
        });
        let failures = self
            .failed
            .iter()
            .map(|(t, m)| (t, m, false))
            .chain(self.retrying.iter().map(|(t, m)| (t, m, true)))
            .take(10)
            .map(|(t, m, retrying)| RolloutFailure {
                tenant: t.clone(),
                retrying,
                message: m.clone(),
            })
            .collect();
        TenantRolloutStatus {
            phase: phase.into(),
            message,
            source: self.source.clone(),
            set_digest: self.digest.clone(),
            migrations: self.migrations.clone(),
            target_version: self.target,
            completed_version: self.completed,
            tenants: RolloutTenants {
                total: self.total,
                done: self.done,
                pending,
                retrying: self.retrying.len() as u64,
                failed: self.failed.len() as u64,
            },
            canary: self.canary.map(|(size, state)| RolloutCanary {
                size,
                state: state.into(),
            }),
            halted: self.halted.is_some(),
            failures,
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            refused: self.refused.clone(),
            conditions,
        }
    }
}

fn version(v: Option<i64>) -> String {
    v.map_or_else(|| "none".into(), |v| v.to_string())
}

/// Where the rollout is published, and the last status written (so that identical reports
/// are not written again; transition times are kept from it).
struct Publisher {
    api: Option<(Api<TenantRollout>, String)>,
    /// Whether the object is known to exist (created, or found); looked for again before the
    /// next write when not (a failed start, an object deleted by hand).
    exists: std::sync::atomic::AtomicBool,
    last: Mutex<Option<TenantRolloutStatus>>,
}

impl Publisher {
    async fn new(client: &Client, object: Option<&(String, String)>) -> Self {
        let me = Self {
            api: object.map(|(ns, name)| (Api::namespaced(client.clone(), ns), name.clone())),
            exists: Default::default(),
            last: Mutex::default(),
        };
        me.ensure().await;
        me
    }

    /// Finds or creates the object (remembering its status); false when it cannot now.
    async fn ensure(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Some((api, name)) = &self.api else {
            return false;
        };
        if self.exists.load(Ordering::SeqCst) {
            return true;
        }
        let found = match api.get_opt(name).await {
            Ok(Some(o)) => Some(o),
            Ok(None) => {
                let mut o = TenantRollout::new(name, TenantRolloutSpec::default());
                o.metadata.labels = Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "tenantry".to_string(),
                    )]
                    .into(),
                );
                match api.create(&PostParams::default(), &o).await {
                    Ok(o) => Some(o),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        api.get_opt(name).await.ok().flatten()
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot create the TenantRollout {name}; will try again");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the TenantRollout {name}; will try again");
                None
            }
        };
        let Some(o) = found else {
            return false;
        };
        let mut last = self.last.lock().expect("publisher lock");
        if last.is_none() {
            *last = o.status;
        }
        self.exists.store(true, Ordering::SeqCst);
        true
    }

    /// The status last written (or found at start).
    fn last(&self) -> Option<TenantRolloutStatus> {
        self.last.lock().expect("publisher lock").clone()
    }

    async fn publish(&self, mut status: TenantRolloutStatus) {
        if !self.ensure().await {
            return;
        }
        let Some((api, name)) = &self.api else {
            return;
        };
        let last = self.last();
        // Keep transition times of conditions whose status did not change.
        if let Some(last) = &last {
            for c in &mut status.conditions {
                if let Some(old) = last
                    .conditions
                    .iter()
                    .find(|o| o.type_ == c.type_ && o.status == c.status)
                {
                    c.last_transition_time = old.last_transition_time.clone();
                }
            }
        }
        if last.as_ref() == Some(&status) {
            return;
        }
        let patch = json!({
            "apiVersion": TenantRollout::api_version(&()),
            "kind": TenantRollout::kind(&()),
            "status": status,
        });
        match api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
        {
            Ok(_) => *self.last.lock().expect("publisher lock") = Some(status),
            Err(e) => {
                if matches!(&e, kube::Error::Api(ae) if ae.code == 404) {
                    self.exists
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
                warn!(error = %e, "cannot write the TenantRollout status")
            }
        }
    }

    /// A Warning Event on the TenantRollout (best effort).
    async fn warn(&self, ctx: &Context, reason: &str, note: &str) {
        let Some((api, name)) = &self.api else {
            return;
        };
        let Ok(Some(obj)) = api.get_opt(name).await else {
            return;
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Rollout".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(error = %e, "failed to publish a TenantRollout event");
        }
    }
}

/// Watches `source` (when there is one) and rolls out every accepted set, publishing on
/// `object`. Runs on the leader until `stop` turns true (the lease is lost or the process
/// shuts down: no tenant is started after that, and those in flight are rolled back).
pub(super) async fn run(
    ctx: Arc<Context>,
    source: Option<MigrationSource>,
    object: Option<(String, String)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = run_until_stopped(ctx, source, object) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

async fn run_until_stopped(
    ctx: Arc<Context>,
    source: Option<MigrationSource>,
    object: Option<(String, String)>,
) {
    ctx.fleet.ready().await;
    let publisher = Publisher::new(&ctx.client, object.as_ref()).await;
    // Failures the Tenants report are about the set the TenantRollout last showed: when this
    // process starts with another one, they do not count against it.
    if publisher
        .last()
        .is_some_and(|s| s.set_digest != digest(&ctx.migrations()))
    {
        ctx.rollout.forget_earlier_failures();
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Candidate>(4);
    let describe = source
        .as_ref()
        .map_or_else(|| "fixed at start".to_string(), MigrationSource::describe);
    let _watcher =
        source.map(|s| AbortOnDrop(tokio::spawn(watch_source(ctx.client.clone(), s, tx))));
    let mut refused = publisher.last().and_then(|s| s.refused);
    let mut last_candidate = digest(&ctx.migrations());
    loop {
        let set = ctx.migrations();
        let report = Arc::new(Mutex::new(Report {
            source: describe.clone(),
            digest: digest(&set),
            migrations: set
                .migrations()
                .iter()
                .map(|m| RolloutMigration {
                    version: m.version,
                    name: format!("{}_{}.sql", m.version, m.description.replace(' ', "_")),
                    checksum: hex(&m.checksum[..8]),
                })
                .collect(),
            target: set.latest(),
            refused: refused.clone(),
            ..Report::default()
        }));
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut exec = Box::pin(execute(
            ctx.clone(),
            set.clone(),
            report.clone(),
            stop.clone(),
        ));
        let mut finished = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let next: MigrationSet = loop {
            tokio::select! {
                _ = &mut exec, if !finished => {
                    finished = true;
                    let status = report.lock().expect("report lock").status();
                    publisher.publish(status).await;
                }
                _ = tick.tick() => {
                    if finished {
                        // Idle: the counts follow the fleet (Tenants provisioned since get
                        // the whole set, deleted ones leave, tenants left to their own
                        // reconciles catch up).
                        let c = census(&ctx, set.latest());
                        report.lock().expect("report lock").follow(c);
                    }
                    let status = report.lock().expect("report lock").status();
                    publisher.publish(status).await;
                }
                candidate = rx.recv() => {
                    let Some(candidate) = candidate else {
                        // No source to watch: finish this rollout, then idle.
                        if !finished {
                            (&mut exec).await;
                            let status = report.lock().expect("report lock").status();
                            publisher.publish(status).await;
                        }
                        return;
                    };
                    let judged = match candidate {
                        Candidate::Refused { reason, message } => {
                            last_candidate = String::new();
                            Err((None, Refusal { reason, message }))
                        }
                        Candidate::Set(new) => {
                            let d = digest(&new);
                            if d == digest(&set) {
                                // Back to the running set: a refusal no longer applies.
                                last_candidate = d;
                                if refused.take().is_some() {
                                    report.lock().expect("report lock").refused = None;
                                }
                                continue;
                            }
                            if d == last_candidate {
                                continue;
                            }
                            last_candidate = d.clone();
                            let mut applied_up_to = ctx.fleet.highest_version().max(ctx.rollout.highest_reached());
                            // While tenants are being migrated, the running set's every
                            // migration may be committing somewhere: none may change.
                            if !finished || ctx.rollout.in_flight() > 0 {
                                applied_up_to = applied_up_to.max(set.latest());
                            }
                            match judge(&set, &new, applied_up_to, &lint(&new)) {
                                Ok(()) => Ok(new),
                                Err(r) => Err((Some(d), r)),
                            }
                        }
                    };
                    match judged {
                        Ok(new) => {
                            info!(digest = %digest(&new), target = ?new.latest(), "new migration set accepted; starting a rollout");
                            break new;
                        }
                        Err((d, r)) => {
                            warn!(reason = r.reason, message = %r.message, "migration set refused; the current set keeps running");
                            let same = refused.as_ref().is_some_and(|old| old.message == r.message);
                            let entry = RefusedSet { set_digest: d, reason: r.reason.into(), message: r.message.clone(), at: now() };
                            refused = Some(entry.clone());
                            report.lock().expect("report lock").refused = Some(entry);
                            if !same {
                                publisher.warn(&ctx, "MigrationSetRefused", &r.message).await;
                            }
                            let status = report.lock().expect("report lock").status();
                            publisher.publish(status).await;
                        }
                    }
                }
            }
        };
        // Stop starting tenants on the old set; those in flight finish.
        stop.notify_one();
        if !finished {
            exec.await;
        }
        refused = None;
        ctx.replace_migrations(next);
    }
}

/// Aborts the task when dropped (the source watch ends with the rollout task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feeds `tx` with what the source holds, whenever it may have changed.
async fn watch_source(
    client: Client,
    source: MigrationSource,
    tx: tokio::sync::mpsc::Sender<Candidate>,
) {
    match &source.kind {
        SourceKind::ConfigMap { namespace, name } => {
            let api: Api<ConfigMap> = Api::namespaced(client, namespace);
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = Box::pin(watcher(api, config).default_backoff());
            while let Some(event) = stream.next().await {
                let candidate = match event {
                    Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => {
                        match compose(source.demo, match from_config_map(&cm) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Candidate::Refused { reason: "InvalidSet", message: format!("ConfigMap {namespace}/{name}: {e}") }).await;
                                continue;
                            }
                        }) {
                            Ok(set) => Candidate::Set(set),
                            Err(e) => Candidate::Refused { reason: "InvalidSet", message: format!("ConfigMap {namespace}/{name}: {e}") },
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => Candidate::Refused {
                        reason: "SourceMissing",
                        message: format!("the migrations ConfigMap {namespace}/{name} was deleted; the current set keeps running"),
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(error = %e, "watching the migrations ConfigMap");
                        continue;
                    }
                };
                if tx.send(candidate).await.is_err() {
                    return;
                }
            }
        }
        SourceKind::Dir(dir) => {
            let mut tick = tokio::time::interval(source.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<String> = None;
            // A set is sent only once two reads in a row agree: a copy or a checkout in
            // progress is never rolled out half-written.
            let mut seen: Option<String> = None;
            loop {
                tick.tick().await;
                let candidate =
                    match MigrationSet::from_dir(dir).and_then(|s| compose(source.demo, s)) {
                        Ok(set) => Candidate::Set(set),
                        Err(e) => Candidate::Refused {
                            reason: "InvalidSet",
                            message: format!("directory {}: {e}", dir.display()),
                        },
                    };
                let key = match &candidate {
                    Candidate::Set(s) => digest(s),
                    Candidate::Refused { message, .. } => message.clone(),
                };
                let settled = seen.as_ref() == Some(&key);
                seen = Some(key.clone());
                if !settled || last.as_ref() == Some(&key) {
                    continue;
                }
                last = Some(key);
                if tx.send(candidate).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Outcome of one tenant's migration.
enum Outcome {
    Done,
    Transient(String),
    Failed(String),
}

/// Rolls `set` out over every provisioned Tenant below its latest version, until done, halted
/// or `stop` is notified (tenants in flight then finish).
async fn execute(
    ctx: Arc<Context>,
    set: Arc<MigrationSet>,
    report: Arc<Mutex<Report>>,
    stop: Arc<tokio::sync::Notify>,
) -> End {
    let target = set.latest();
    let fleet = ctx.fleet.every_tenant();
    let total = fleet.iter().filter(|t| counts(t)).count() as u64;
    let mut queue: VecDeque<Target> = fleet.iter().filter_map(|t| target_of(t, target)).collect();
    // Sorted for a stable order (the canary is the first tenants by namespace and name).
    queue
        .make_contiguous()
        .sort_by(|a, b| a.label.cmp(&b.label));
    let behind = queue.len() as u64;
    let policy = ctx.rollout.policy();
    {
        let mut r = report.lock().expect("report lock");
        r.total = total;
        r.done = total.saturating_sub(behind);
        if behind == 0 {
            r.completed = target;
            r.end = Some(End::Complete);
            let last_started = r.started_at.clone();
            r.started_at = last_started.or_else(|| Some(now()));
            r.finished_at = Some(now());
            return End::Complete;
        }
        r.started_at = Some(now());
        r.canary = (policy.canary > 0).then_some((policy.canary as u64, "Running"));
    }
    info!(target = ?target, tenants = behind, "rollout started");
    let started = Instant::now();
    let conc = ctx.servers.default_admin().pool_size().max(1) as usize;
    let mut retry: BinaryHeap<std::cmp::Reverse<(Instant, u64, usize)>> = BinaryHeap::new();
    let mut retry_items: HashMap<u64, (Target, u32)> = HashMap::new();
    let mut seq = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let mut migrated: Vec<ObjectRef<Tenant>> = Vec::new();
    let mut woken: HashSet<String> = HashSet::new();
    let mut stopping = false;
    let mut halted: Option<String> = None;
    let mut attempts: HashMap<String, u32> = HashMap::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        // Start what may start.
        while !stopping && halted.is_none() && in_flight.len() < conc {
            let due = retry
                .peek()
                .is_some_and(|std::cmp::Reverse((at, _, _))| *at <= Instant::now());
            let next = if due {
                let std::cmp::Reverse((_, id, _)) = retry.pop().expect("peeked");
                retry_items.remove(&id).map(|(t, _)| t)
            } else {
                queue.pop_front()
            };
            let Some(t) = next else { break };
            // Still one of the rollout's tenants? (Deleted, suspended, paused or migrated by
            // its own reconcile since the rollout started: skipped.)
            // (Or its server is not registered: its own reconcile reports that.)
            let Some((t, admin)) = ctx
                .fleet
                .get(&t.tenant)
                .and_then(|now| Some((target_of(&now, target)?, ctx.servers.admin_of(&now)?)))
            else {
                continue;
            };
            match ctx.rollout.admit(
                t.names.schema.as_str(),
                ctx.fleet.progress(target),
                target,
                &ctx.metrics,
            ) {
                Admission::Go(permit) => {
                    let set = &set;
                    in_flight.push(async move {
                        let result = admin.migrate(&t.names, set).await;
                        let outcome = match result {
                            Ok(_) => {
                                permit.succeeded();
                                Outcome::Done
                            }
                            Err(e) if e.is_transient() => Outcome::Transient(e.to_string()),
                            Err(e) => {
                                permit.failed();
                                Outcome::Failed(e.to_string())
                            }
                        };
                        (t, outcome)
                    });
                }
                Admission::Hold(Hold::Pending | Hold::Locked, message) => {
                    queue.push_front(t);
                    report.lock().expect("report lock").waiting = Some(message);
                    break;
                }
                Admission::Hold(Hold::Halted, message) => {
                    queue.push_front(t);
                    halted = Some(message);
                    break;
                }
            }
        }
        if in_flight.is_empty()
            && (stopping || halted.is_some() || (queue.is_empty() && retry.is_empty()))
        {
            break;
        }
        // Wake for a due retry or a queued tenant only when one could start now; otherwise
        // for an in-flight tenant's end (or the stop).
        let can_start = !stopping && halted.is_none() && in_flight.len() < conc;
        let far = Instant::now() + Duration::from_secs(3600);
        let wake_at = if can_start {
            let next_retry = retry.peek().map(|std::cmp::Reverse((at, _, _))| *at);
            let queued = (!queue.is_empty()).then(|| Instant::now() + Duration::from_millis(200));
            next_retry.into_iter().chain(queued).min().unwrap_or(far)
        } else {
            far
        };
        tokio::select! {
            Some((t, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                let mut r = report.lock().expect("report lock");
                r.waiting = None;
                match outcome {
                    Outcome::Done => {
                        r.done += 1;
                        r.retrying.remove(&t.label);
                        migrated.push(t.tenant.clone());
                    }
                    Outcome::Transient(message) => {
                        let n = attempts.entry(t.label.clone()).or_insert(0);
                        *n += 1;
                        // The Tenant reports it in its own conditions too.
                        if woken.insert(t.label.clone()) {
                            ctx.wake(t.tenant.clone());
                        }
                        if *n >= ROLLOUT_ATTEMPTS {
                            r.retrying.insert(t.label.clone(), format!("{message} (attempt {n}; left to the tenant's own reconcile, which retries it)"));
                            ctx.wake(t.tenant.clone());
                        } else {
                            let wait = backoff(*n);
                            r.retrying.insert(t.label.clone(), format!("{message} (attempt {n}, retrying in {}s)", wait.as_secs()));
                            seq += 1;
                            retry.push(std::cmp::Reverse((Instant::now() + wait, seq, 0)));
                            retry_items.insert(seq, (t, *n));
                        }
                    }
                    Outcome::Failed(message) => {
                        r.retrying.remove(&t.label);
                        // The Tenant reports it in its own conditions and an Event.
                        ctx.rollout.record_failure(t.names.schema.as_str(), message.clone());
                        r.failed.insert(t.label.clone(), message);
                        ctx.wake(t.tenant.clone());
                    }
                }
                if let Some((size, _)) = r.canary {
                    let fleet_done = ctx.fleet.progress(target).done as u64;
                    let done = (r.done.saturating_sub(total.saturating_sub(behind))).max(fleet_done);
                    if !r.failed.is_empty() && done < size {
                        r.canary = Some((size, "Failed"));
                    } else if done >= size {
                        r.canary = Some((size, "Passed"));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = &mut stopped, if !stopping => { stopping = true; }
        }
    }
    let end = if stopping {
        End::Superseded
    } else if halted.is_some() {
        End::Halted
    } else if !report.lock().expect("report lock").failed.is_empty() {
        End::Failed
    } else if !report.lock().expect("report lock").retrying.is_empty() {
        End::Waiting
    } else {
        End::Complete
    };
    {
        let mut r = report.lock().expect("report lock");
        r.end = Some(end);
        r.halted = halted.clone();
        r.waiting = None;
        if end != End::Superseded {
            r.finished_at = Some(now());
        }
        if end == End::Complete {
            r.completed = target;
        }
        info!(target = ?target, done = r.done, failed = r.failed.len(), took_ms = started.elapsed().as_millis() as u64, end = ?end, "rollout finished");
        if let Some(message) = &halted {
            warn!(%message, "rollout halted");
        }
    }
    // Off the critical path: each migrated Tenant's status catches up in a reconcile.
    for t in migrated {
        ctx.wake(t);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> MigrationSet {
        MigrationSet::from_files(files.iter().map(|(n, s)| (n.to_string(), s.to_string()))).unwrap()
    }

    #[test]
    fn a_set_that_changes_or_drops_an_applied_migration_is_refused() {
        let current = set(&[
            ("1_a.sql", "CREATE TABLE a ();"),
            ("2_b.sql", "CREATE TABLE b ();"),
        ]);
        let changed = set(&[
            ("1_a.sql", "CREATE TABLE a (x int);"),
            ("2_b.sql", "CREATE TABLE b ();"),
        ]);
        let r = judge(&current, &changed, Some(2), &[]).unwrap_err();
        assert_eq!(r.reason, "ChecksumChanged");
        assert!(
            r.message
                .starts_with("migration 1 (a) was changed after tenants applied it"),
            "{}",
            r.message
        );
        let dropped = set(&[("2_b.sql", "CREATE TABLE b ();")]);
        assert_eq!(
            judge(&current, &dropped, Some(1), &[]).unwrap_err().reason,
            "MigrationRemoved"
        );
        // Nothing applied anywhere yet above version 1: migration 2 may be fixed in place.
        let fixed = set(&[
            ("1_a.sql", "CREATE TABLE a ();"),
            ("2_b.sql", "CREATE TABLE b (y int);"),
        ]);
        assert_eq!(judge(&current, &fixed, Some(1), &[]), Ok(()));
        assert_eq!(judge(&current, &changed, None, &[]), Ok(()));
        // Adding one is the normal case.
        let more = set(&[
            ("1_a.sql", "CREATE TABLE a ();"),
            ("2_b.sql", "CREATE TABLE b ();"),
            ("3_c.sql", "SELECT 1;"),
        ]);
        assert_eq!(judge(&current, &more, Some(2), &[]), Ok(()));
        let r = judge(&current, &more, Some(2), &["3_c.sql:1: rule: x".into()]).unwrap_err();
        assert_eq!(r.reason, "LintFailed");
        // A migration slipped in below what tenants reached would run out of order on them.
        let gap = set(&[("1_a.sql", "CREATE TABLE a ();"), ("3_c.sql", "SELECT 1;")]);
        let filled = set(&[
            ("1_a.sql", "CREATE TABLE a ();"),
            ("2_b.sql", "CREATE TABLE b ();"),
            ("3_c.sql", "SELECT 1;"),
        ]);
        assert_eq!(
            judge(&gap, &filled, Some(3), &[]).unwrap_err().reason,
            "MigrationOutOfOrder"
        );
        assert_eq!(judge(&gap, &filled, Some(1), &[]), Ok(()));
    }

    #[test]
    fn the_digest_follows_names_and_contents() {
        let a = set(&[("1_a.sql", "x")]);
        assert_eq!(digest(&a), digest(&set(&[("1_a.sql", "x")])));
        assert_ne!(digest(&a), digest(&set(&[("1_a.sql", "y")])));
        assert_ne!(digest(&a), digest(&set(&[("1_b.sql", "x")])));
        assert_eq!(digest(&a).len(), 16);
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn the_report_reads_as_phases() {
        let mut r = Report {
            target: Some(3),
            total: 4,
            done: 2,
            ..Report::default()
        };
        let s = r.status();
        assert_eq!((s.phase.as_str(), s.tenants.pending), ("Progressing", 2));
        r.retrying.insert("ns/a".into(), "locked".into());
        r.failed.insert("ns/b".into(), "broken".into());
        let s = r.status();
        assert_eq!(s.phase, "Waiting", "only retrying tenants left");
        assert_eq!(
            (s.tenants.failed, s.tenants.retrying, s.tenants.pending),
            (1, 1, 1)
        );
        assert_eq!(s.failures.len(), 2);
        r.end = Some(End::Failed);
        assert_eq!(r.status().phase, "Failed");
        r.halted = Some("too many".into());
        let s = r.status();
        assert_eq!(s.phase, "Halted");
        assert!(s
            .conditions
            .iter()
            .any(|c| c.type_ == condition::HALTED && c.status == "True"));
        let done = Report {
            target: Some(3),
            completed: Some(3),
            total: 4,
            done: 4,
            end: Some(End::Complete),
            ..Report::default()
        };
        let s = done.status();
        assert_eq!(s.phase, "Complete");
        assert!(s
            .conditions
            .iter()
            .any(|c| c.type_ == condition::COMPLETE && c.status == "True"));
    }
}
