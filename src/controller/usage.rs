//! Storage usage of the whole fleet: one periodic measurement (catalog functions only, see
//! [`crate::postgres::Admin::measure_usage`]) kept in memory, the bounded per-tenant metric,
//! and a reconcile for exactly the Tenants whose status or quota state the new numbers change
//! (by the write rule of [`crate::domain::limits::usage_worth_writing`]). Reconciles read the
//! numbers here; they never measure.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{runtime::reflector::ObjectRef, ResourceExt};
use tracing::{debug, warn};

use super::{context::Context, reconcile::now};
use crate::domain::{
    crd::Tenant,
    limits::{over_quota, usage_worth_writing, TenantLimits},
};

/// One schema's usage as last measured: bytes, and when (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Measured {
    pub bytes: u64,
    pub at: String,
}

/// The last measurement of every tenant schema.
#[derive(Debug, Default)]
pub(super) struct UsageBook {
    by_schema: Mutex<HashMap<String, Measured>>,
}

impl UsageBook {
    pub fn get(&self, schema: &str) -> Option<Measured> {
        self.by_schema
            .lock()
            .expect("usage lock")
            .get(schema)
            .cloned()
    }

    /// Replaces the book with a new measurement (schemas not measured this time keep their
    /// last value, unless no watched Tenant has them any more).
    fn record(&self, measured: impl IntoIterator<Item = (String, u64)>, at: &str, live: &[&str]) {
        let mut book = self.by_schema.lock().expect("usage lock");
        book.retain(|schema, _| live.contains(&schema.as_str()));
        for (schema, bytes) in measured {
            book.insert(
                schema,
                Measured {
                    bytes,
                    at: at.to_string(),
                },
            );
        }
    }
}

/// The storage quota of `tenant` in bytes, if it has a valid one.
pub(super) fn quota_of(tenant: &Tenant) -> Option<u64> {
    TenantLimits::of(&tenant.spec.limits)
        .ok()
        .and_then(|l| l.storage_bytes)
}

impl Context {
    /// The last measured usage of `schema`.
    pub(super) fn usage(&self, schema: &str) -> Option<Measured> {
        self.usage.get(schema)
    }

    /// Whether the last measurement would change what `tenant`'s status says: its usage is
    /// worth a write, or its quota state flips. A reconcile then does the full pipeline.
    pub(super) fn usage_news(&self, tenant: &Tenant) -> bool {
        let Some(status) = tenant.status.as_ref() else {
            return false;
        };
        let Some(m) = status.schema.as_deref().and_then(|s| self.usage(s)) else {
            return false;
        };
        let quota = quota_of(tenant);
        let shown = status
            .usage
            .as_ref()
            .map(|u| (u.bytes.max(0) as u64, u.measured_at.as_str()));
        let was_over = tenant.is_over_quota();
        usage_worth_writing(shown, m.bytes, &m.at, quota)
            || over_quota(was_over, Some(m.bytes), quota) != was_over
    }
}

/// Measures the fleet every `interval` until dropped (the runtime aborts it when the
/// controller stops). Only the leader runs it.
pub(super) async fn run(ctx: Arc<Context>, interval: Duration) {
    // The first measurement one interval after start, when the watch has long filled the
    // store.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        measure_once(&ctx).await;
    }
}

/// One measurement of every watched, provisioned Tenant that is not being deleted.
async fn measure_once(ctx: &Context) {
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
    let schema = |t: &Tenant| -> String {
        t.status
            .as_ref()
            .and_then(|s| s.schema.clone())
            .unwrap_or_default()
    };
    let schemas: Vec<String> = tenants.iter().map(|t| schema(t)).collect();
    let started = Instant::now();
    let at = now();
    // One query per server, over the tenants placed there.
    let mut measured = HashMap::new();
    for (server, schemas) in ctx.by_server(&tenants, schema) {
        let Some(admin) = ctx.servers.admin(&server) else {
            continue;
        };
        match admin.measure_usage(&schemas).await {
            Ok(m) => measured.extend(m),
            Err(e) => {
                warn!(%server, error = %e, "could not measure storage usage; retrying at the next interval");
            }
        }
    }
    let took = started.elapsed();
    let live: Vec<&str> = schemas.iter().map(String::as_str).collect();
    ctx.metrics.set_storage(tenants.iter().filter_map(|t| {
        let bytes = *measured.get(&schema(t))?;
        Some((
            format!("{}/{}", t.namespace().unwrap_or_default(), t.name_any()),
            bytes,
        ))
    }));
    ctx.usage.record(measured, &at, &live);
    let mut woken = 0;
    for t in &tenants {
        if ctx.usage_news(t) {
            woken += 1;
            ctx.wake(ObjectRef::from_obj(&**t));
        }
    }
    debug!(
        tenants = tenants.len(),
        woken,
        took_ms = took.as_millis() as u64,
        "measured storage usage"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_keeps_only_live_schemas() {
        let book = UsageBook::default();
        book.record(
            [("a".to_string(), 1), ("b".to_string(), 2)],
            "t1",
            &["a", "b"],
        );
        book.record([("a".to_string(), 3)], "t2", &["a"]);
        assert_eq!(
            book.get("a"),
            Some(Measured {
                bytes: 3,
                at: "t2".into()
            })
        );
        assert_eq!(book.get("b"), None, "a Tenant gone takes its number along");
        // Not measured this time (a lock), still watched: the last number stands.
        book.record(Vec::<(String, u64)>::new(), "t3", &["a"]);
        assert_eq!(book.get("a").unwrap().at, "t2");
    }
}
