//! Rollout control for a new migration set across tenants that are already provisioned: a
//! canary first, and a halt after too many failures. Decided from counters the Tenant watch
//! keeps (so it survives restarts, and costs the same at any fleet size) and from this
//! process's own in-flight and failed migrations (which the watch may not show yet).

use std::{
    sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
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
    /// Tenants whose migration failed since this process started (or since the current set
    /// was accepted).
    failed: AtomicUsize,
    /// Tenants this process brought to the target version since then.
    done: AtomicUsize,
    /// Set once a live set change restarted the counters: from then on this process's own
    /// counts are the whole truth, and Tenants still reporting an earlier set's failure no
    /// longer count against the new one. Until then (a restart), they do: a halt survives a
    /// restart of the operator.
    fresh: AtomicBool,
    /// The highest version this process brought a tenant to (`i64::MIN`: none).
    reached: AtomicI64,
    /// The target of the current set (`i64::MIN`: none).
    target: AtomicI64,
    /// Why the rollout's migration of a schema failed, until that Tenant's reconcile reports
    /// it (schema → message).
    failures: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// An in-flight slot of the rollout, released when dropped.
pub(super) struct Permit<'a> {
    rollout: &'a Rollout,
}

impl Permit<'_> {
    /// The migration failed for a reason retrying will not fix: it counts against the rollout.
    pub fn failed(self) {
        self.rollout.failed.fetch_add(1, Ordering::SeqCst);
    }

    /// The tenant reached the target version.
    pub fn succeeded(self) {
        self.rollout.done.fetch_add(1, Ordering::SeqCst);
        let target = self.rollout.target.load(Ordering::SeqCst);
        self.rollout.reached.fetch_max(target, Ordering::SeqCst);
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
        self.failed.store(0, Ordering::SeqCst);
        self.done.store(0, Ordering::SeqCst);
        self.fresh.store(true, Ordering::SeqCst);
        self.failures.lock().expect("rollout lock").clear();
        self.target
            .store(target.unwrap_or(i64::MIN), Ordering::SeqCst);
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

    /// Whether a tenant may migrate to `target` now, given the fleet's `progress` toward it
    /// (kept from the watch, see [`super::fleet::Fleet::progress`]). Also reports the
    /// rollout's progress in `metrics`.
    pub fn admit(
        &self,
        progress: Progress,
        target: Option<i64>,
        metrics: &Metrics,
    ) -> Admission<'_> {
        let Progress {
            total,
            done,
            failed: failed_seen,
        } = progress;
        let own_failed = self.failed.load(Ordering::SeqCst);
        let failed = if self.fresh.load(Ordering::SeqCst) {
            own_failed
        } else {
            failed_seen.max(own_failed)
        };
        let done = done.max(self.done.load(Ordering::SeqCst));
        metrics.rollout(target, total.saturating_sub(done), failed);
        let version = target.unwrap_or_default();
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
                return Admission::Go(Permit { rollout: self });
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
        let Admission::Go(permit) = rollout.admit(nobody_yet, Some(3), &metrics) else {
            panic!("the first tenant is the canary");
        };
        assert!(matches!(
            rollout.admit(nobody_yet, Some(3), &metrics),
            Admission::Hold(Hold::Pending, _)
        ));
        drop(permit);
        let Admission::Go(permit) = rollout.admit(nobody_yet, Some(3), &metrics) else {
            panic!("the slot was released");
        };
        permit.failed();
        assert!(matches!(
            rollout.admit(nobody_yet, Some(3), &metrics),
            Admission::Hold(Hold::Halted, _)
        ));
    }
}
