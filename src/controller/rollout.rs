//! Rollout control for a new migration set across tenants that are already provisioned: a
//! canary first, and a halt after too many failures. Decided from counters the Tenant watch
//! keeps (so it survives restarts, and costs the same at any fleet size) and from this
//! process's own in-flight and failed migrations (which the watch may not show yet).

use std::{
    sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use super::{
    fleet::Progress,
    reconcile::{REQUEUE_MIGRATION_LOCKED, REQUEUE_ROLLOUT_HALTED, REQUEUE_ROLLOUT_PENDING},
};
use crate::telemetry::Metrics;

/// Rollout control for a new migration set across existing tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutPolicy {
    /// Migrate this many tenants first; the rest wait until they are all at the new version.
    /// 0: no canary.
    pub canary: usize,
    /// Stop migrating once this many tenants failed the new set. 0: never stop.
    pub max_failures: usize,
}

/// Why a tenant's pending migrations are held back. The tenant keeps working at its current
/// version meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// The canary has not reached the new version yet, or failed it.
    Pending,
    /// Too many tenants failed the new set.
    Halted,
    /// The tenant's migration gave up waiting for a lock on its tables (its own long
    /// transaction, typically); retried soon. Not an admission decision: the outcome of an
    /// attempt.
    Locked,
}

impl Hold {
    /// The reason of the MigrationsApplied condition (and of the RolloutHalted Event).
    pub fn reason(self) -> &'static str {
        match self {
            Hold::Pending => "RolloutPending",
            Hold::Halted => "RolloutHalted",
            Hold::Locked => "MigrationLocked",
        }
    }

    /// When to look again.
    pub fn requeue(self) -> Duration {
        match self {
            Hold::Pending => REQUEUE_ROLLOUT_PENDING,
            Hold::Halted => REQUEUE_ROLLOUT_HALTED,
            Hold::Locked => REQUEUE_MIGRATION_LOCKED,
        }
    }
}

/// What the rollout lets one tenant do now.
pub(super) enum Admission<'a> {
    /// Migrate now, holding an in-flight slot.
    Go(Permit<'a>),
    /// Not now, and why (the condition message).
    Hold(Hold, String),
}

/// The policy and this process's own part of the rollout.
#[derive(Debug, Default)]
pub(super) struct Rollout {
    policy: RolloutPolicy,
    /// Tenants being migrated right now (for the canary).
    in_flight: AtomicUsize,
    /// Which set the counts below are about: bumped by [`Rollout::restart`], so that a permit
    /// of an earlier set that finishes after the change counts for nothing.
    generation: AtomicU64,
    /// Schemas whose migration failed since this process started (or since the current set
    /// was accepted), and schemas this process brought to the target version since then.
    /// Sets, not counters: a tenant retried by its reconcile and by the rollout counts once.
    counts: std::sync::Mutex<Counts>,
    /// Set once a live set change restarted the counts, or when the set loaded at start is
    /// not the one the TenantRollout last reported: from then on this process's own counts
    /// are the whole truth, and Tenants still reporting an earlier set's failure no longer
    /// count against this one. Until then (a restart with the same set), they do: a halt
    /// survives a restart of the operator.
    fresh: AtomicBool,
    /// The highest version this process brought a tenant to (`i64::MIN`: none).
    reached: AtomicI64,
    /// The target of the current set (`i64::MIN`: none).
    target: AtomicI64,
    /// Why the rollout's migration of a schema failed, until that Tenant's reconcile reports
    /// it (schema → message).
    failures: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

#[derive(Debug, Default)]
struct Counts {
    failed: std::collections::HashSet<String>,
    done: std::collections::HashSet<String>,
}

/// An in-flight slot of the rollout for one schema, released when dropped.
pub(super) struct Permit<'a> {
    rollout: &'a Rollout,
    schema: String,
    generation: u64,
}

impl Permit<'_> {
    fn current(&self) -> bool {
        self.generation == self.rollout.generation.load(Ordering::SeqCst)
    }

    /// The migration failed for a reason retrying will not fix: it counts against the rollout
    /// (once per schema).
    pub fn failed(self) {
        if self.current() {
            let mut c = self.rollout.counts.lock().expect("rollout lock");
            c.failed.insert(self.schema.clone());
        }
    }

    /// The schema is at the target version.
    pub fn succeeded(self) {
        if self.current() {
            let mut c = self.rollout.counts.lock().expect("rollout lock");
            c.failed.remove(&self.schema);
            c.done.insert(self.schema.clone());
            let target = self.rollout.target.load(Ordering::SeqCst);
            self.rollout.reached.fetch_max(target, Ordering::SeqCst);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.rollout.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Rollout {
    pub fn new(policy: RolloutPolicy, target: Option<i64>) -> Self {
        Self {
            policy,
            reached: AtomicI64::new(i64::MIN),
            target: AtomicI64::new(target.unwrap_or(i64::MIN)),
            ..Self::default()
        }
    }

    pub fn policy(&self) -> RolloutPolicy {
        self.policy
    }

    /// A new set was accepted: its rollout starts from this process's own counts.
    pub fn restart(&self, target: Option<i64>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.counts.lock().expect("rollout lock") = Counts::default();
        self.fresh.store(true, Ordering::SeqCst);
        self.failures.lock().expect("rollout lock").clear();
        self.target
            .store(target.unwrap_or(i64::MIN), Ordering::SeqCst);
    }

    /// The set loaded at start is not the one the failures Tenants report are about.
    pub fn forget_earlier_failures(&self) {
        self.fresh.store(true, Ordering::SeqCst);
    }

    /// Migrations running right now (the rollout's and reconciles').
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Records why the migration of `schema` failed, for its Tenant's next reconcile.
    pub fn record_failure(&self, schema: &str, message: String) {
        self.failures
            .lock()
            .expect("rollout lock")
            .insert(schema.to_string(), message);
    }

    /// Why the rollout's migration of `schema` failed, if it did and nobody reported it yet.
    pub fn take_failure(&self, schema: &str) -> Option<String> {
        self.failures.lock().expect("rollout lock").remove(schema)
    }

    /// The highest version this process brought a tenant to (statuses may not show it yet).
    pub fn highest_reached(&self) -> Option<i64> {
        Some(self.reached.load(Ordering::SeqCst)).filter(|v| *v != i64::MIN)
    }

    /// Whether the tenant of `schema` may migrate to `target` now, given the fleet's
    /// `progress` toward it (kept from the watch, see [`super::fleet::Fleet::progress`]).
    /// Also reports the rollout's progress in `metrics`.
    pub fn admit(
        &self,
        schema: &str,
        progress: Progress,
        target: Option<i64>,
        metrics: &Metrics,
    ) -> Admission<'_> {
        let Progress {
            total,
            done,
            failed: failed_seen,
        } = progress;
        let (own_failed, own_done) = {
            let c = self.counts.lock().expect("rollout lock");
            (c.failed.len(), c.done.len())
        };
        let failed = if self.fresh.load(Ordering::SeqCst) {
            own_failed
        } else {
            failed_seen.max(own_failed)
        };
        let done = done.max(own_done);
        metrics.rollout(target, total.saturating_sub(done), failed);
        let version = target.unwrap_or_default();
        let generation = self.generation.load(Ordering::SeqCst);
        loop {
            let in_flight = self.in_flight.load(Ordering::SeqCst);
            if let Some((hold, message)) = held(self.policy, version, done, failed, in_flight) {
                return Admission::Hold(hold, message);
            }
            if self
                .in_flight
                .compare_exchange(in_flight, in_flight + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Admission::Go(Permit {
                    rollout: self,
                    schema: schema.to_string(),
                    generation,
                });
            }
        }
    }
}

/// The rule: halted once `max_failures` tenants failed `version`; while the canary runs, only
/// as many tenants as it has places migrate.
fn held(
    p: RolloutPolicy,
    version: i64,
    done: usize,
    failed: usize,
    in_flight: usize,
) -> Option<(Hold, String)> {
    if p.max_failures > 0 && failed >= p.max_failures {
        return Some((
            Hold::Halted,
            format!(
                "rollout of migration version {version} halted: {failed} tenants failed it (limit {}); fix the migration set: a new set starts a new rollout",
                p.max_failures
            ),
        ));
    }
    if p.canary > 0 && done < p.canary && done + in_flight + failed >= p.canary {
        let message = if failed > 0 {
            format!(
                "the canary failed: {failed} of {} canary tenants could not reach version {version}",
                p.canary
            )
        } else {
            format!(
                "waiting for the canary: {done} of {} canary tenants at version {version}",
                p.canary
            )
        };
        return Some((Hold::Pending, message));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: RolloutPolicy = RolloutPolicy {
        canary: 1,
        max_failures: 1,
    };

    #[test]
    fn the_canary_goes_alone_then_everyone() {
        assert_eq!(held(CANARY, 3, 0, 0, 0), None);
        let (hold, message) = held(CANARY, 3, 0, 0, 1).unwrap();
        assert_eq!(hold, Hold::Pending);
        assert_eq!(
            message,
            "waiting for the canary: 0 of 1 canary tenants at version 3"
        );
        assert_eq!(held(CANARY, 3, 1, 0, 5), None, "canary done");
        assert_eq!(held(RolloutPolicy::default(), 3, 0, 9, 9), None);
    }

    #[test]
    fn failures_halt_the_rollout() {
        let (hold, message) = held(CANARY, 3, 0, 1, 0).unwrap();
        assert_eq!(hold, Hold::Halted);
        assert!(message.starts_with("rollout of migration version 3 halted"));
        let policy = RolloutPolicy {
            canary: 2,
            max_failures: 0,
        };
        let (hold, message) = held(policy, 3, 0, 1, 1).unwrap();
        assert_eq!(hold, Hold::Pending);
        assert!(message.starts_with("the canary failed: 1 of 2"));
    }

    #[test]
    fn holds_map_to_the_condition_reasons_and_delays() {
        assert_eq!(Hold::Pending.reason(), "RolloutPending");
        assert_eq!(Hold::Halted.reason(), "RolloutHalted");
        assert_eq!(Hold::Pending.requeue(), Duration::from_secs(5));
        assert_eq!(Hold::Halted.requeue(), Duration::from_secs(60));
    }

    #[test]
    fn a_permit_holds_a_slot_until_dropped() {
        let rollout = Rollout::new(CANARY, Some(3));
        let nobody_yet = Progress::default();
        let metrics = Metrics::default();
        let Admission::Go(permit) = rollout.admit("a", nobody_yet, Some(3), &metrics) else {
            panic!("the first tenant is the canary");
        };
        assert!(matches!(
            rollout.admit("a", nobody_yet, Some(3), &metrics),
            Admission::Hold(Hold::Pending, _)
        ));
        drop(permit);
        let Admission::Go(permit) = rollout.admit("a", nobody_yet, Some(3), &metrics) else {
            panic!("the slot was released");
        };
        permit.failed();
        assert!(matches!(
            rollout.admit("a", nobody_yet, Some(3), &metrics),
            Admission::Hold(Hold::Halted, _)
        ));
    }

    #[test]
    fn a_tenant_counts_once_and_an_earlier_sets_permit_not_at_all() {
        let nobody_yet = Progress::default();
        let metrics = Metrics::default();
        // The same tenant failing twice (its reconcile and the rollout) is one failure.
        let halting = Rollout::new(
            RolloutPolicy {
                canary: 0,
                max_failures: 2,
            },
            Some(3),
        );
        for _ in 0..2 {
            let Admission::Go(p) = halting.admit("a", nobody_yet, Some(3), &metrics) else {
                panic!("one failed tenant does not halt at 2");
            };
            p.failed();
        }
        assert!(matches!(
            halting.admit("b", nobody_yet, Some(3), &metrics),
            Admission::Go(_)
        ));
        // Succeeding twice is one of the canary's two places.
        let canary = Rollout::new(
            RolloutPolicy {
                canary: 2,
                max_failures: 0,
            },
            Some(3),
        );
        for _ in 0..2 {
            let Admission::Go(p) = canary.admit("c", nobody_yet, Some(3), &metrics) else {
                panic!("the canary has a free place");
            };
            p.succeeded();
        }
        let Admission::Go(d) = canary.admit("d", nobody_yet, Some(3), &metrics) else {
            panic!("the canary's second place");
        };
        assert!(matches!(
            canary.admit("e", nobody_yet, Some(3), &metrics),
            Admission::Hold(Hold::Pending, _)
        ));
        // A permit of the set before a live change counts for nothing in the new one.
        canary.restart(Some(4));
        d.failed();
        assert!(matches!(
            canary.admit("e", nobody_yet, Some(4), &metrics),
            Admission::Go(_)
        ));
        assert_eq!(canary.highest_reached(), Some(3));
    }
}
