//! Schema drift of the whole fleet: one periodic scan (one catalog query for every tenant
//! schema's fingerprint hash, see [`crate::postgres::fingerprint`]) compared with the reference
//! of each tenant's `status.migrationVersion`; only the schemas whose hash is unexpected have
//! their descriptors read (one more query for all of them) and their differences named. The
//! findings are kept in memory, and only the Tenants whose `SchemaDrift` condition they change
//! are reconciled; reconciles read the book and never scan. Nothing is repaired: drift is a
//! report.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::runtime::reflector::ObjectRef;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::context::Context;
use crate::{
    domain::{
        crd::{condition, Tenant},
        drift::{differences, drift_message, version_label},
    },
    postgres::{fingerprint::References, migrations::MigrationSet},
};

/// What the last scan found of one schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    /// The version the schema was compared with: its `status.migrationVersion`, or the version
    /// it matches while its status lags behind a rollout.
    pub version: Option<i64>,
    /// What differs from that version's reference; empty when the schema matches it.
    pub differences: Vec<String>,
}

impl Finding {
    /// The `SchemaDrift` condition: status, reason, message.
    pub fn condition(&self) -> (&'static str, &'static str, String) {
        let version = version_label(self.version);
        if self.differences.is_empty() {
            (
                "False",
                "MatchesVersion",
                format!("the schema matches {version}"),
            )
        } else {
            (
                "True",
                "Drifted",
                drift_message(&version, &self.differences),
            )
        }
    }
}

/// The last findings of every scanned schema, and the references they were made with.
#[derive(Debug, Default)]
pub(super) struct DriftBook {
    by_schema: Mutex<HashMap<String, Finding>>,
    /// The references of one migration set (by its digest), built once per set.
    references: Mutex<Option<(Vec<u8>, Arc<References>)>>,
}

impl DriftBook {
    pub fn get(&self, schema: &str) -> Option<Finding> {
        self.by_schema
            .lock()
            .expect("drift lock")
            .get(schema)
            .cloned()
    }

    /// Records new findings; schemas not read this time keep their last finding unless no
    /// watched Tenant has them any more. Returns how many live schemas are drifted.
    fn record(&self, found: impl IntoIterator<Item = (String, Finding)>, live: &[&str]) -> usize {
        let mut book = self.by_schema.lock().expect("drift lock");
        book.retain(|schema, _| live.contains(&schema.as_str()));
        book.extend(found);
        book.values().filter(|f| !f.differences.is_empty()).count()
    }
}

/// What identifies a migration set for its references: every version and checksum.
fn digest(set: &MigrationSet) -> Vec<u8> {
    let mut h = Sha256::new();
    for m in set.migrations() {
        h.update(m.version.to_be_bytes());
        h.update(&m.checksum);
    }
    h.finalize().to_vec()
}

impl Context {
    /// The last finding about `schema`.
    pub(super) fn drift(&self, schema: &str) -> Option<Finding> {
        self.drift.get(schema)
    }

    /// Whether the last scan would change `tenant`'s `SchemaDrift` condition: it flips, or
    /// the differences named change. (A message that only names another matching version is
    /// not worth a write of its own.)
    pub(super) fn drift_news(&self, tenant: &Tenant) -> bool {
        let Some(f) = tenant
            .status
            .as_ref()
            .and_then(|s| s.schema.as_deref())
            .and_then(|s| self.drift(s))
        else {
            return false;
        };
        let (status, _, message) = f.condition();
        match tenant.condition(condition::SCHEMA_DRIFT) {
            None => true,
            Some(c) => c.status != status || (status == "True" && c.message != message),
        }
    }

    /// The references of `set`, built now unless they were for this set already.
    async fn references(&self, set: &MigrationSet) -> Option<Arc<References>> {
        let key = digest(set);
        if let Some((k, refs)) = self.drift.references.lock().expect("drift lock").as_ref() {
            if *k == key {
                return Some(refs.clone());
            }
        }
        let started = Instant::now();
        match self.servers.default_admin().build_references(set).await {
            Ok(refs) => {
                let took = started.elapsed();
                self.metrics.set_drift_reference(took);
                info!(
                    versions = refs.len(),
                    took_ms = took.as_millis() as u64,
                    "built the schema drift references of the migration set"
                );
                let refs = Arc::new(refs);
                *self.drift.references.lock().expect("drift lock") = Some((key, refs.clone()));
                Some(refs)
            }
            Err(e) => {
                warn!(error = %e, "could not build the schema drift references; retrying at the next interval");
                None
            }
        }
    }
}

/// Scans the fleet every `interval` until dropped (the runtime aborts it when the controller
/// stops). Only the leader runs it.
pub(super) async fn run(ctx: Arc<Context>, interval: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        scan_once(&ctx).await;
    }
}

/// One scan of every watched, provisioned Tenant that is not being deleted.
async fn scan_once(ctx: &Context) {
    // The set as it is at the start of this scan (the references follow it).
    let set = ctx.migrations();
    let tenants: Vec<Arc<Tenant>> = ctx
        .fleet
        .every_tenant()
        .into_iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .filter(|t| t.status.as_ref().is_some_and(|s| s.schema.is_some()))
        .collect();
    if tenants.is_empty() {
        return;
    }
    let Some(refs) = ctx.references(&set).await else {
        return;
    };
    let of = |t: &Tenant| -> (String, Option<i64>) {
        let s = t.status.as_ref();
        (
            s.and_then(|s| s.schema.clone()).unwrap_or_default(),
            s.and_then(|s| s.migration_version),
        )
    };
    let schemas: Vec<String> = tenants.iter().map(|t| of(t).0).collect();
    let started = Instant::now();
    // One scan per server, over the tenants placed there.
    let mut hashes = crate::postgres::fingerprint::Scan::default();
    let mut admins = HashMap::new();
    for (server, schemas) in ctx.by_server(&tenants, |t| of(t).0) {
        let Some(admin) = ctx.servers.admin(&server) else {
            continue;
        };
        match admin.fingerprint_hashes(&schemas).await {
            Ok(h) => {
                for s in h.of.keys() {
                    admins.insert(s.clone(), server.clone());
                }
                hashes.merge(h);
            }
            Err(e) => {
                warn!(%server, error = %e, "could not scan the fleet for schema drift; retrying at the next interval");
            }
        }
    }
    let mut found: Vec<(String, Finding)> = Vec::new();
    let mut suspects: Vec<(String, Option<i64>)> = Vec::new();
    for t in &tenants {
        let (schema, expected) = of(t);
        let Some(hash) = hashes.of.get(&schema) else {
            continue;
        };
        match matching_version(hash, expected, &refs) {
            Some(v) => found.push((schema, clean(v))),
            None => suspects.push((schema, expected)),
        }
    }
    let mut read_again = 0;
    // Suspects read again on their own server.
    let mut on: std::collections::BTreeMap<String, Vec<(String, Option<i64>)>> = Default::default();
    for (schema, expected) in suspects {
        if let Some(server) = admins.get(&schema) {
            on.entry(server.clone())
                .or_default()
                .push((schema, expected));
        }
    }
    for (server, suspects) in on {
        let Some(admin) = ctx.servers.admin(&server) else {
            continue;
        };
        let names: Vec<String> = suspects.iter().map(|(s, _)| s.clone()).collect();
        match admin.fingerprint_descriptors(&names).await {
            Ok(mut scan) => {
                for (schema, expected) in suspects {
                    let Some(theirs) = scan.of.remove(&schema) else {
                        continue;
                    };
                    // A version the set does not hold (the tenant's migration fails for it):
                    // compared with the set's latest.
                    let Some((version, reference)) = refs
                        .get_key_value(&expected)
                        .or_else(|| refs.iter().next_back())
                    else {
                        continue;
                    };
                    let items =
                        differences(&theirs, &reference.descriptors, &version_label(*version));
                    read_again += 1;
                    found.push((
                        schema,
                        Finding {
                            version: *version,
                            differences: items,
                        },
                    ));
                }
            }
            Err(e) => {
                warn!(error = %e, "could not read the descriptors of drifted schemas; retrying at the next interval");
            }
        }
    }
    let took = started.elapsed();
    let live: Vec<&str> = schemas.iter().map(String::as_str).collect();
    let drifted = ctx.drift.record(found, &live);
    ctx.metrics.set_schema_drift(drifted, took);
    let mut woken = 0;
    for t in &tenants {
        // A paused Tenant's status stays as it was until the pause is lifted.
        if !t.is_paused() && ctx.drift_news(t) {
            woken += 1;
            ctx.wake(ObjectRef::from_obj(&**t));
        }
    }
    debug!(
        tenants = tenants.len(),
        busy = hashes.busy.len(),
        read_again,
        drifted,
        woken,
        took_ms = took.as_millis() as u64,
        "scanned the fleet for schema drift"
    );
    if woken > 0 {
        info!(drifted, woken, "schema drift findings changed");
    }
}

/// The version whose reference `hash` is: `expected` (the tenant's status) when it is, else
/// any other version of the set — the schema is at another version of the set, a rollout
/// whose status writes have not caught up: not drift. `None`: no version matches.
fn matching_version(hash: &str, expected: Option<i64>, refs: &References) -> Option<Option<i64>> {
    let matches = |v: &Option<i64>| refs.get(v).is_some_and(|r| r.hash == hash);
    if matches(&expected) {
        return Some(expected);
    }
    refs.keys().find(|v| matches(v)).copied()
}

fn clean(version: Option<i64>) -> Finding {
    Finding {
        version,
        differences: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_make_the_condition() {
        let (s, r, m) = clean(Some(3)).condition();
        assert_eq!((s, r), ("False", "MatchesVersion"));
        assert_eq!(m, "the schema matches migration version 3");
        let f = Finding {
            version: Some(3),
            differences: vec!["table audit: missing".into()],
        };
        let (s, r, m) = f.condition();
        assert_eq!((s, r), ("True", "Drifted"));
        assert_eq!(
            m,
            "the schema differs from migration version 3: table audit: missing"
        );
        assert_eq!(
            clean(None).condition().2,
            "the schema matches the schema before any migration"
        );
    }

    #[test]
    fn the_book_keeps_only_live_schemas_and_counts_drift() {
        let book = DriftBook::default();
        let drifted = Finding {
            version: Some(1),
            differences: vec!["x".into()],
        };
        let n = book.record(
            [
                ("a".to_string(), clean(Some(1))),
                ("b".to_string(), drifted.clone()),
            ],
            &["a", "b"],
        );
        assert_eq!(n, 1);
        // b not read this time (busy): its finding stands.
        assert_eq!(book.record([], &["a", "b"]), 1);
        assert_eq!(book.get("b"), Some(drifted));
        assert_eq!(
            book.record([], &["a"]),
            0,
            "a Tenant gone takes its finding along"
        );
        assert_eq!(book.get("b"), None);
    }

    #[test]
    fn a_schema_at_another_version_of_the_set_is_not_drift() {
        use crate::postgres::fingerprint::Reference;
        let r = |h: &str| Reference {
            hash: h.into(),
            descriptors: Vec::new(),
        };
        let refs: References = [(None, r("e")), (Some(1), r("a")), (Some(2), r("b"))].into();
        assert_eq!(matching_version("b", Some(2), &refs), Some(Some(2)));
        // Status lag: the status says 1, the schema is at 2 already.
        assert_eq!(matching_version("b", Some(1), &refs), Some(Some(2)));
        assert_eq!(matching_version("e", Some(1), &refs), Some(None));
        assert_eq!(matching_version("x", Some(2), &refs), None);
        // The same hash for two versions (a migration that changes nothing compared): the
        // status's version wins.
        let refs: References = [(Some(1), r("a")), (Some(2), r("a"))].into();
        assert_eq!(matching_version("a", Some(2), &refs), Some(Some(2)));
    }

    #[test]
    fn a_changed_set_has_another_digest() {
        let a = MigrationSet::from_files([("1_a.sql".to_string(), "x".to_string())]).unwrap();
        let b = MigrationSet::from_files([("1_a.sql".to_string(), "y".to_string())]).unwrap();
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a), digest(&a.clone()));
    }
}
