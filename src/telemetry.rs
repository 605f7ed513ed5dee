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
        LogFormat::Json => registry.with(json_layer(std::io::stdout)).try_init()?,
    }
    Ok(())
}

/// JSON lines with every field at the top level, as controller-runtime writes them: the
/// fields of the spans in scope (a reconcile's `namespace`, `name`, `tenant`; a request's
/// route and tenant), then the event's own.
pub fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .fmt_fields(fmt::format::JsonFields::new())
        .event_format(FlatJson)
        .with_writer(writer)
}

/// The event formatter of [`json_layer`].
struct FlatJson;

impl<S, N> fmt::FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut writer: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::Value;
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            k8s_openapi::jiff::Timestamp::now().to_string().into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            // Outermost first, so that an inner span's field wins.
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<fmt::FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields) {
                    line.extend(map);
                }
            }
        }
        event.record(&mut FieldsVisitor(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Writes an event's fields into the JSON line.
struct FieldsVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
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
struct BuildLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
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
    leader: Gauge,
    storage: Family<TenantLabel, Gauge>,
    drift_tenants: Gauge,
    drift_scan: Gauge<f64, std::sync::atomic::AtomicU64>,
    drift_reference: Gauge<f64, std::sync::atomic::AtomicU64>,
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
            "reconcile",
            "Tenant reconciles by result",
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
            "migration_pending_tenants",
            "Tenants not yet at the target migration version",
            behind.clone(),
        );
        registry.register(
            "migration_failed_tenants",
            "Tenants whose migration failed",
            failed.clone(),
        );
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the label carries the operator's version",
            build,
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica reconciles (the leader, or the only replica), 0 on standby",
            leader.clone(),
        );
        let storage = Family::<TenantLabel, Gauge>::default();
        registry.register(
            "tenant_storage_bytes",
            "Storage used by the largest tenants' schemas (tenant=\"<namespace>/<name>\"), and by all others together (tenant=\"other\"), as last measured",
            storage.clone(),
        );
        let drift_tenants = Gauge::default();
        registry.register(
            "schema_drift_tenants",
            "Tenants whose schema differs from the reference of their migration version, as last scanned",
            drift_tenants.clone(),
        );
        let drift_scan = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "schema_drift_scan_seconds",
            "Duration of the last schema drift scan of the fleet",
            drift_scan.clone(),
        );
        let drift_reference = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "schema_drift_reference_seconds",
            "Duration of the last build of the migration set's reference fingerprints",
            drift_reference.clone(),
        );
        Self {
            drift_tenants,
            drift_scan,
            drift_reference,
            target_version,
            behind,
            failed,
            leader,
            storage,
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

    /// The storage gauge from one measurement of the fleet (`namespace/name`, bytes): the
    /// largest tenants get a series each and the rest one `other` series, so the series count
    /// is bounded whatever the fleet size (see [`crate::domain::limits::top_with_other`]).
    pub fn set_storage(&self, usage: impl IntoIterator<Item = (String, u64)>) {
        let usage: Vec<(String, u64)> = usage.into_iter().collect();
        let series =
            crate::domain::limits::top_with_other(usage.iter().map(|(t, b)| (t.as_str(), *b)));
        // Tenants that left the top lose their series.
        self.storage.clear();
        for (tenant, bytes) in series {
            self.storage
                .get_or_create(&TenantLabel { tenant })
                .set(bytes.min(i64::MAX as u64) as i64);
        }
    }

    /// The result of one schema drift scan: how many tenants drifted, and how long it took.
    pub fn set_schema_drift(&self, drifted: usize, took: std::time::Duration) {
        self.drift_tenants.set(drifted as i64);
        self.drift_scan.set(took.as_secs_f64());
    }

    /// How long building the reference fingerprints of a migration set took.
    pub fn set_drift_reference(&self, took: std::time::Duration) {
        self.drift_reference.set(took.as_secs_f64());
    }

    /// Whether this replica reconciles (leader or only replica) or stands by.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
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
    fn json_logs_put_span_fields_at_the_top_level() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "reconcile",
                namespace = "team-a",
                name = "acme",
                tenant = "acme"
            );
            let _g = span.enter();
            tracing::info!(schema = "team_a_acme", attempt = 2, "tenant provisioned");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["namespace"], "team-a", "{line}");
        assert_eq!(line["name"], "acme");
        assert_eq!(line["tenant"], "acme");
        assert_eq!(line["schema"], "team_a_acme");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["message"], "tenant provisioned");
        assert_eq!(line["level"], "INFO");
    }

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
            text.contains("tenantry_reconcile_total{result=\"ok\"} 1"),
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
        let build = format!(
            "tenantry_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.contains("tenantry_leader 0"), "{text}");
        m.set_leader(true);
        assert!(m.encode().contains("tenantry_leader 1"));
    }

    #[test]
    fn storage_series_stay_bounded_whatever_the_fleet_size() {
        let m = Metrics::default();
        let series = |m: &Metrics| {
            m.encode()
                .lines()
                .filter(|l| l.starts_with("tenantry_tenant_storage_bytes{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        m.set_storage((0..1000u64).map(|i| (format!("ns/t{i:04}"), i * 1000)));
        let lines = series(&m);
        assert_eq!(lines.len(), 21, "{lines:?}");
        assert!(lines
            .contains(&"tenantry_tenant_storage_bytes{tenant=\"ns/t0999\"} 999000".to_string()));
        let rest: u64 = (0..980u64).map(|i| i * 1000).sum();
        assert!(lines.contains(&format!(
            "tenantry_tenant_storage_bytes{{tenant=\"other\"}} {rest}"
        )));
        // A tenant that leaves the top loses its series; the count stays bounded.
        m.set_storage((0..1000u64).map(|i| (format!("ns/t{i:04}"), (1000 - i) * 1000)));
        let lines = series(&m);
        assert_eq!(lines.len(), 21);
        assert!(!lines.iter().any(|l| l.contains("ns/t0999")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("ns/t0000")));
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
            "tenantry_migration_pending_tenants 1",
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
            text.contains("tenantry_migration_pending_tenants 0"),
            "{text}"
        );
    }
}
