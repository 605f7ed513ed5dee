//! Logs and metrics: the tracing subscriber (text or JSON, filtered by level) and the
//! Prometheus registry with the operator's metrics. Label sets are bounded: stages, results
//! and phases, never tenant names.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::domain::crd::Phase;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` is an EnvFilter directive such as `info` or
/// `tenantry=debug,kube=info`.
pub fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer()).try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()?,
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// Phase and migration version of one tenant, as last reconciled.
type TenantState = (Phase, Option<i64>);

/// Every tenant's state, with how many stand at each migration version: a status write updates
/// the gauges by difference, at the same cost whatever the fleet size.
#[derive(Debug, Default)]
struct Phases {
    of: HashMap<String, TenantState>,
    at_version: HashMap<Option<i64>, i64>,
}

/// The operator's metrics, registered under the `tenantry` prefix.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<StageLabel, Counter>,
    duration: Histogram,
    tenants: Family<PhaseLabel, Gauge>,
    phases: Arc<Mutex<Phases>>,
    target_version: Gauge,
    behind: Gauge,
    failed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tenantry");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let errors = Family::<StageLabel, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let tenants = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "reconciliations",
            "Tenant reconciliations by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by stage",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one Tenant reconcile",
            duration.clone(),
        );
        registry.register(
            "tenants",
            "Tenants by phase, as last reconciled",
            tenants.clone(),
        );
        for p in Phase::ALL {
            tenants
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .set(0);
        }
        let target_version = Gauge::default();
        let behind = Gauge::default();
        let failed = Gauge::default();
        registry.register(
            "migration_target_version",
            "Latest version of the operator's migration set",
            target_version.clone(),
        );
        registry.register(
            "tenants_migration_pending",
            "Tenants not yet at the target migration version",
            behind.clone(),
        );
        registry.register(
            "tenants_migration_failed",
            "Tenants whose migration failed",
            failed.clone(),
        );
        Self {
            target_version,
            behind,
            failed,
            registry: Arc::new(registry),
            reconciles,
            errors,
            duration,
            tenants,
            phases: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, seconds: f64, error_stage: Option<&'static str>) {
        self.duration.observe(seconds);
        let result = if error_stage.is_some() { "error" } else { "ok" };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        if let Some(stage) = error_stage {
            self.errors.get_or_create(&StageLabel { stage }).inc();
        }
    }

    /// Records the phase and migration version of one tenant (`None` once it is gone) and
    /// updates the gauges by the difference.
    pub fn set_phase(&self, key: String, state: Option<TenantState>) {
        let mut phases = self.phases.lock().expect("metrics lock");
        let old = match state {
            Some(s) => phases.of.insert(key, s),
            None => phases.of.remove(&key),
        };
        if old != state {
            if let Some((phase, version)) = old {
                self.tenants
                    .get_or_create(&PhaseLabel {
                        phase: phase.as_str(),
                    })
                    .dec();
                *phases.at_version.entry(version).or_default() -= 1;
            }
            if let Some((phase, version)) = state {
                self.tenants
                    .get_or_create(&PhaseLabel {
                        phase: phase.as_str(),
                    })
                    .inc();
                *phases.at_version.entry(version).or_default() += 1;
            }
        }
        let target = self.target_version.get();
        if target > 0 {
            let at_target = phases.at_version.get(&Some(target)).copied().unwrap_or(0);
            self.behind.set(phases.of.len() as i64 - at_target);
        }
    }

    /// The latest version of the migration set, against which tenants count as pending.
    pub fn set_migration_target(&self, target: Option<i64>) {
        self.target_version.set(target.unwrap_or(0));
    }

    /// Aggregate progress of a migration rollout; logs a line per tenth of the fleet.
    pub fn rollout(&self, target: Option<i64>, behind: usize, failed: usize) {
        let before = self.behind.get();
        self.target_version.set(target.unwrap_or(0));
        self.behind.set(behind as i64);
        self.failed.set(failed as i64);
        let total = self.phases.lock().expect("metrics lock").of.len().max(1) as i64;
        let step = (total / 10).max(1);
        if before != behind as i64 && (behind as i64 / step != before / step || behind == 0) {
            tracing::info!(
                target_version = target,
                pending = behind,
                failed,
                "migration rollout progress"
            );
        }
    }

    /// Reconciles finished so far (any result).
    pub fn reconciliations(&self) -> u64 {
        ["ok", "error"]
            .into_iter()
            .map(|result| self.reconciles.get_or_create(&ResultLabel { result }).get())
            .sum()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_and_phase_gauges() {
        let m = Metrics::default();
        m.reconciled(0.1, None);
        m.reconciled(0.2, Some("migrations"));
        m.set_phase("ns/a".into(), Some((Phase::Ready, Some(2))));
        m.set_phase("ns/b".into(), Some((Phase::Ready, Some(2))));
        m.set_phase("ns/b".into(), None);
        let text = m.encode();
        assert!(
            text.contains("tenantry_reconciliations_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tenantry_reconcile_errors_total{stage=\"migrations\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tenantry_tenants{phase=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tenantry_tenants{phase=\"Failed\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn phase_gauges_follow_changes_by_difference() {
        let m = Metrics::default();
        m.set_migration_target(Some(3));
        m.set_phase("ns/a".into(), Some((Phase::Provisioning, None)));
        m.set_phase("ns/b".into(), Some((Phase::Ready, Some(3))));
        m.set_phase("ns/a".into(), Some((Phase::Ready, Some(2))));
        m.set_phase("ns/a".into(), Some((Phase::Ready, Some(2))));
        let text = m.encode();
        for line in [
            "tenantry_tenants{phase=\"Ready\"} 2",
            "tenantry_tenants{phase=\"Provisioning\"} 0",
            "tenantry_tenants_migration_pending 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        m.set_phase("ns/a".into(), None);
        let text = m.encode();
        assert!(
            text.contains("tenantry_tenants{phase=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tenantry_tenants_migration_pending 0"),
            "{text}"
        );
    }
}
