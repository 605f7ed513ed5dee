//! Rolling a new migration set over existing tenants: canary first, a halt after too many
//! failures that survives restarts, nothing applied twice, changed migrations refused.

use tenantry::{
    controller::RolloutPolicy,
    domain::crd::{Phase, Tenant},
    postgres::migrations::MigrationSet,
};

use crate::common::*;

fn set_with(extra: &[(&str, &str)]) -> MigrationSet {
    let mut files = MigrationSet::embedded().to_files();
    for (name, sql) in extra {
        files.retain(|(n, _)| !n.starts_with(&name[..2]));
        files.push((name.to_string(), sql.to_string()));
    }
    MigrationSet::from_files(files).unwrap()
}

async fn provision(ns: &TestNs, names: &[&str]) {
    let _ctl = RunningController::start(ns).await;
    for n in names {
        ns.create(Tenant::test(n)).await;
    }
    for n in names {
        wait_ready(ns, n).await;
    }
}

fn version(t: &Tenant) -> Option<i64> {
    t.status.as_ref().and_then(|s| s.migration_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_set_stops_after_the_canary_and_stays_stopped() {
    let ns = TestNs::new().await;
    let names = ["r1", "r2", "r3", "r4"];
    provision(&ns, &names).await;
    let failing = set_with(&[("3_broken.sql", "SELECT 1/0;")]);
    let policy = RolloutPolicy {
        canary: 1,
        max_failures: 1,
    };
    let opts = || ControllerOpts {
        migrations: failing.clone(),
        rollout: policy,
        ..ControllerOpts::default()
    };
    let ctl = RunningController::start_with(&ns, opts()).await;
    let mut failed = Vec::new();
    let mut halted = Vec::new();
    for n in names {
        let t = wait_tenant(&ns, n, "a rollout verdict", |t| {
            t.condition("MigrationsApplied")
                .is_some_and(|c| c.reason == "MigrationFailed" || c.reason == "RolloutHalted")
        })
        .await;
        assert_eq!(version(&t), Some(2), "{n} stays at version 2");
        match t.condition("MigrationsApplied").unwrap().reason.as_str() {
            "MigrationFailed" => failed.push(n),
            _ => {
                assert!(t.is_ready(), "{n}: a held-back tenant keeps serving");
                halted.push(n)
            }
        }
    }
    assert_eq!(
        failed.len(),
        1,
        "only the canary tried: failed {failed:?}, halted {halted:?}"
    );
    let t = ns.tenants().get(halted[0]).await.unwrap();
    assert!(
        t.condition("MigrationsApplied")
            .unwrap()
            .message
            .contains("halted"),
        "{:?}",
        t.condition("MigrationsApplied")
    );
    assert!(events(&ns, halted[0])
        .await
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "RolloutHalted"));
    let m = ctl.metrics.encode();
    assert!(m.contains("tenantry_migration_target_version 3"), "{m}");
    assert!(m.contains("tenantry_migration_failed_tenants 1"), "{m}");
    drop(ctl);

    // After a restart the halt holds (the failure is in the canary's status): nothing retried.
    let ctl = RunningController::start_with(&ns, opts()).await;
    let m = ctl.metrics.clone();
    eventually(
        "reconciles after restart",
        std::time::Duration::from_secs(30),
        move || {
            let m = m.clone();
            async move { (m.reconciliations() >= 4).then_some(()) }
        },
    )
    .await;
    let canary = ns.tenants().get(failed[0]).await.unwrap();
    assert_eq!(
        canary.condition("MigrationsApplied").unwrap().reason,
        "MigrationFailed",
        "the canary keeps reporting its failure after a restart"
    );
    let m = ctl.metrics.encode();
    assert!(
        m.contains("tenantry_migration_failed_tenants 1"),
        "the halt is remembered: {m}"
    );
    for n in names {
        let applied: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".tenantry_migrations",
            ns.schema(n)
        ))
        .fetch_one(&pg().await)
        .await
        .unwrap();
        assert_eq!(applied, 2, "{n}");
    }
    drop(ctl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_set_rolls_out_everywhere_and_a_changed_migration_is_refused() {
    let ns = TestNs::new().await;
    let names = ["g1", "g2", "g3"];
    provision(&ns, &names).await;
    let good = set_with(&[(
        "3_priority.sql",
        "ALTER TABLE tasks ADD COLUMN priority int NOT NULL DEFAULT 0;",
    )]);
    let ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations: good,
            rollout: RolloutPolicy {
                canary: 1,
                max_failures: 1,
            },
            ..ControllerOpts::default()
        },
    )
    .await;
    for n in names {
        let t = wait_tenant(&ns, n, "version 3", |t| {
            version(t) == Some(3) && t.is_ready()
        })
        .await;
        assert_eq!(t.condition("MigrationsApplied").unwrap().status, "True");
    }
    assert!(ctl
        .metrics
        .encode()
        .contains("tenantry_migration_pending_tenants 0"));
    drop(ctl);

    // Editing an applied migration is refused per tenant, never re-run.
    let edited = set_with(&[(
        "3_priority.sql",
        "ALTER TABLE tasks ADD COLUMN priority bigint;",
    )]);
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations: edited,
            ..ControllerOpts::default()
        },
    )
    .await;
    for n in names {
        let t = wait_tenant(&ns, n, "checksum mismatch", |t| {
            t.condition("MigrationsApplied")
                .is_some_and(|c| c.message.contains("checksum mismatch"))
        })
        .await;
        assert_eq!(t.status.unwrap().phase, Phase::Failed);
    }
}
