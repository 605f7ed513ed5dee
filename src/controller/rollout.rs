//! Rollout control for a new migration set across tenants that are already provisioned:
//! a canary first, and a halt after too many failures.

use std::sync::atomic::Ordering;

use super::context::Context;
use crate::domain::crd::condition;
/// Rollout control for a new migration set across existing tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutPolicy {
    /// Migrate this many tenants first; the rest wait until they are all at the new version.
    /// 0: no canary.
    pub canary: usize,
    /// Stop migrating once this many tenants failed the new set. 0: never stop.
    pub max_failures: usize,
}

/// What the rollout lets one tenant do now.
pub(super) enum Admit {
    Go,
    Wait(String),
    Halted(String),
}

/// Decides, from the Tenants in the watch cache (so it survives restarts) and from this
/// process's own in-flight and failed migrations (which the cache may not show yet), whether a
/// tenant may migrate now. `Go` reserves an in-flight slot the caller must release.
pub(super) fn admit(ctx: &Context) -> Admit {
    let target = ctx.migrations.latest();
    let mut total = 0usize;
    let mut done = 0usize;
    let mut failed_seen = 0usize;
    for t in ctx.store.state() {
        total += 1;
        if t.status.as_ref().and_then(|s| s.migration_version) == target {
            done += 1;
        }
        if t.condition(condition::MIGRATIONS_APPLIED)
            .is_some_and(|c| c.reason == "MigrationFailed")
        {
            failed_seen += 1;
        }
    }
    let failed = failed_seen.max(ctx.migration_failures.load(Ordering::SeqCst));
    ctx.metrics
        .rollout(target, total.saturating_sub(done), failed);
    let p = ctx.rollout;
    let version = target.unwrap_or_default();
    if p.max_failures > 0 && failed >= p.max_failures {
        return Admit::Halted(format!(
            "rollout of migration version {version} halted: {failed} tenants failed it (limit {}); fix the migration set and restart the operator",
            p.max_failures
        ));
    }
    loop {
        let in_flight = ctx.migrating.load(Ordering::SeqCst);
        if p.canary > 0 && done < p.canary && done + in_flight + failed >= p.canary {
            return Admit::Wait(if failed > 0 {
                format!("the canary failed: {failed} of {} canary tenants could not reach version {version}", p.canary)
            } else {
                format!(
                    "waiting for the canary: {done} of {} canary tenants at version {version}",
                    p.canary
                )
            });
        }
        if ctx
            .migrating
            .compare_exchange(in_flight, in_flight + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Admit::Go;
        }
    }
}
