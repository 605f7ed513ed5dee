//! Live migration sets: a change to the migrations ConfigMap rolls out without a restart and is
//! reported on one TenantRollout; a set that changes an applied migration is refused
//! fleet-wide before anything runs; a tenant whose own transaction holds a lock on its table
//! fails fast and is retried while the rest of the fleet completes; a halted rollout is
//! repaired by fixing the failing migration in place.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tenantry::{
    controller::{MigrationSource, RolloutPolicy, SourceKind},
    domain::{
        crd::Tenant,
        rollout::{TenantRollout, TenantRolloutStatus},
    },
    postgres::migrations::MigrationSet,
};

use crate::common::*;

const CM: &str = "tenant-migrations";
const PRIORITY: (&str, &str) = (
    "3_priority.sql",
    "ALTER TABLE tasks ADD COLUMN priority int NOT NULL DEFAULT 0;",
);

/// Replaces the migrations ConfigMap's data with `files` (server-side apply, one manager).
async fn put_migrations(ns: &TestNs, files: &[(&str, &str)]) {
    let api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let data: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    api.patch(
        CM,
        &PatchParams::apply("live-test").force(),
        &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CM},
            "data": data,
        })),
    )
    .await
    .expect("apply the migrations ConfigMap");
}

/// An operator watching the test's migrations ConfigMap (the demo set first).
async fn live_operator(ns: &TestNs, policy: RolloutPolicy) -> RunningController {
    put_migrations(ns, &[]).await;
    RunningController::start_with(
        ns,
        ControllerOpts {
            migrations: MigrationSet::embedded(),
            rollout: policy,
            source: Some(MigrationSource {
                kind: SourceKind::ConfigMap {
                    namespace: ns.name.clone(),
                    name: CM.into(),
                },
                demo: true,
                poll: Duration::from_secs(1),
            }),
            ..ControllerOpts::default()
        },
    )
    .await
}

#[track_caller]
fn wait_rollout<'a>(
    ns: &'a TestNs,
    what: &'a str,
    pred: impl Fn(&TenantRolloutStatus) -> bool + Send + Sync + 'static,
) -> impl std::future::Future<Output = TenantRolloutStatus> + 'a {
    let api: Api<TenantRollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let pred = std::sync::Arc::new(pred);
    eventually(what, Duration::from_secs(60), move || {
        let api = api.clone();
        let pred = pred.clone();
        async move {
            api.get_opt(ROLLOUT)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.status)
                .filter(|s| pred(s))
        }
    })
}

async fn history(schema: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM \"{schema}\".tenantry_migrations ORDER BY version"
    ))
    .fetch_all(&pg().await)
    .await
    .unwrap()
}

async fn has_column(schema: &str, table: &str, column: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                         WHERE table_schema = $1 AND table_name = $2 AND column_name = $3)",
    )
    .bind(schema)
    .bind(table)
    .bind(column)
    .fetch_one(&pg().await)
    .await
    .unwrap()
}

fn version(t: &Tenant) -> Option<i64> {
    t.status.as_ref().and_then(|s| s.migration_version)
}

async fn provision(ns: &TestNs, names: &[&str]) {
    for n in names {
        ns.create(Tenant::test(n)).await;
    }
    for n in names {
        wait_ready(ns, n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_change_rolls_out_without_a_restart_and_an_applied_change_is_refused() {
    let ns = TestNs::new().await;
    let names = ["l1", "l2", "l3"];
    let _ctl = live_operator(&ns, RolloutPolicy::default()).await;
    provision(&ns, &names).await;
    // The counts follow the fleet while the rollout is idle.
    let first = wait_rollout(&ns, "the demo set complete over 3 tenants", |s| {
        s.completed_version == Some(2) && s.phase == "Complete" && s.tenants.total == 3
    })
    .await;
    assert_eq!(first.tenants.done, 3, "{first:?}");
    assert!(first.source.contains(CM) && first.source.ends_with("+ demo set"));

    // A new migration in the ConfigMap: rolled out by the running operator; `kubectl wait`
    // waits for it.
    put_migrations(&ns, &[PRIORITY]).await;
    let waited = tokio::task::spawn_blocking({
        let ns = ns.name.clone();
        move || {
            kubectl(&[
                "wait",
                "-n",
                &ns,
                &format!("tenantrollout/{ROLLOUT}"),
                "--for=jsonpath={.status.completedVersion}=3",
                "--timeout=60s",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        waited.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let done = wait_rollout(&ns, "version 3 complete", |s| {
        s.completed_version == Some(3)
    })
    .await;
    assert_eq!(done.phase, "Complete");
    assert_eq!(
        (done.tenants.done, done.tenants.pending, done.tenants.failed),
        (3, 0, 0)
    );
    assert_eq!(done.migrations.len(), 3);
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    for n in names {
        assert!(has_column(&ns.schema(n), "tasks", "priority").await, "{n}");
        // Each Tenant's own status catches up after the rollout.
        wait_tenant(&ns, n, "migrationVersion 3", |t| {
            version(t) == Some(3) && t.is_ready()
        })
        .await;
    }

    // Changing the applied migration 3 (and adding 4 in the same change): refused for the
    // whole fleet before anything runs; the running set stays.
    put_migrations(
        &ns,
        &[
            (
                "3_priority.sql",
                "ALTER TABLE tasks ADD COLUMN priority bigint;",
            ),
            (
                "4_labels.sql",
                "CREATE TABLE labels (id bigint PRIMARY KEY);",
            ),
        ],
    )
    .await;
    let refused = wait_rollout(&ns, "the changed set refused", |s| {
        s.refused
            .as_ref()
            .is_some_and(|r| r.reason == "ChecksumChanged")
    })
    .await;
    let r = refused.refused.as_ref().unwrap();
    assert!(
        r.message
            .starts_with("migration 3 (priority) was changed after tenants applied it"),
        "{}",
        r.message
    );
    assert_eq!(refused.target_version, Some(3), "the running set stays");
    let accepted = refused
        .conditions
        .iter()
        .find(|c| c.type_ == "SetAccepted")
        .unwrap();
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "ChecksumChanged")
    );
    let warned = eventually("a MigrationSetRefused Event", Duration::from_secs(30), {
        let ns_name = ns.name.clone();
        let client = ns.client.clone();
        move || {
            let api: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(client.clone(), &ns_name);
            async move {
                let list = api.list(&Default::default()).await.ok()?;
                list.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some("MigrationSetRefused")
                        && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                            == Some("TenantRollout")
                })
            }
        }
    })
    .await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in names {
        assert_eq!(history(&ns.schema(n)).await, [1, 2, 3], "{n}: nothing ran");
        let t = ns.tenants().get(n).await.unwrap();
        assert!(t.is_ready(), "{n} keeps serving");
    }

    // Restored, with 4 kept: accepted, rolled out, the refusal cleared.
    put_migrations(
        &ns,
        &[
            PRIORITY,
            (
                "4_labels.sql",
                "CREATE TABLE labels (id bigint PRIMARY KEY);",
            ),
        ],
    )
    .await;
    let four = wait_rollout(&ns, "version 4 complete", |s| {
        s.completed_version == Some(4)
    })
    .await;
    assert!(four.refused.is_none(), "{four:?}");
    for n in names {
        assert_eq!(history(&ns.schema(n)).await, [1, 2, 3, 4], "{n}");
    }

    // An index built under a long exclusive lock on a populated table: the lint refuses the
    // set for the whole fleet, naming the rule and the file:line; nothing runs.
    put_migrations(
        &ns,
        &[
            PRIORITY,
            (
                "4_labels.sql",
                "CREATE TABLE labels (id bigint PRIMARY KEY);",
            ),
            (
                "5_title.sql",
                "-- find tasks by title\nCREATE INDEX tasks_title_idx ON tasks (title);",
            ),
        ],
    )
    .await;
    let linted = wait_rollout(&ns, "the lint refusal", |s| {
        s.refused.as_ref().is_some_and(|r| r.reason == "LintFailed")
    })
    .await;
    let message = &linted.refused.as_ref().unwrap().message;
    assert!(
        message.contains("5_title.sql:2: [create-index-non-concurrent]"),
        "names the file, line and rule: {message}"
    );
    assert_eq!(linted.target_version, Some(4));
    for n in names {
        assert_eq!(
            history(&ns.schema(n)).await,
            [1, 2, 3, 4],
            "{n}: nothing ran"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_locking_its_own_table_is_retried_while_the_fleet_completes() {
    let ns = TestNs::new().await;
    let names = ["k1", "k2", "k3"];
    let _ctl = live_operator(&ns, RolloutPolicy::default()).await;
    provision(&ns, &names).await;
    wait_rollout(&ns, "the demo set complete", |s| {
        s.completed_version == Some(2)
    })
    .await;

    // The tenant's own login holds its table locked in an open transaction.
    let uri = secret_value(&ns.secrets().get("k2-db").await.unwrap(), "uri");
    let mut tenant = PgConnection::connect(&uri).await.unwrap();
    sqlx::Executor::execute(
        &mut tenant,
        "BEGIN; LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE;",
    )
    .await
    .unwrap();

    let started = Instant::now();
    put_migrations(&ns, &[PRIORITY]).await;
    let waiting = wait_rollout(&ns, "two done, the locked tenant retrying", |s| {
        s.target_version == Some(3) && s.tenants.done == 2 && s.tenants.retrying == 1
    })
    .await;
    let others_done = started.elapsed();
    assert!(
        others_done < Duration::from_secs(20),
        "the rest of the fleet waited {others_done:?} for the locked tenant"
    );
    let f = &waiting.failures[0];
    assert!(f.tenant.ends_with("/k2") && f.retrying, "{f:?}");
    assert!(f.message.contains("lock"), "{}", f.message);
    assert!(has_column(&ns.schema("k1"), "tasks", "priority").await);
    assert!(!has_column(&ns.schema("k2"), "tasks", "priority").await);
    // The tenant says so in its own conditions, and keeps serving at version 2.
    let t = wait_tenant(&ns, "k2", "a lock condition", |t| {
        t.condition("MigrationsApplied")
            .is_some_and(|c| c.status == "False" && c.message.contains("lock"))
    })
    .await;
    assert_eq!(version(&t), Some(2));

    // Released: the retry brings it up, and the rollout completes.
    sqlx::Executor::execute(&mut tenant, "COMMIT")
        .await
        .unwrap();
    let done = wait_rollout(&ns, "version 3 complete", |s| {
        s.completed_version == Some(3)
    })
    .await;
    assert_eq!((done.tenants.done, done.tenants.retrying), (3, 0));
    assert!(has_column(&ns.schema("k2"), "tasks", "priority").await);
    wait_tenant(&ns, "k2", "version 3", |t| {
        version(t) == Some(3) && t.is_ready()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_rollout_is_repaired_by_fixing_the_migration_in_place() {
    let ns = TestNs::new().await;
    let names = ["h1", "h2", "h3"];
    let _ctl = live_operator(
        &ns,
        RolloutPolicy {
            canary: 1,
            max_failures: 1,
        },
    )
    .await;
    provision(&ns, &names).await;
    wait_rollout(&ns, "the demo set complete", |s| {
        s.completed_version == Some(2)
    })
    .await;

    put_migrations(&ns, &[("3_broken.sql", "SELECT 1/0;")]).await;
    let halted = wait_rollout(&ns, "the rollout halted", |s| s.phase == "Halted").await;
    assert!(halted.halted);
    assert_eq!(halted.tenants.failed, 1, "{halted:?}");
    assert_eq!(
        halted.canary.as_ref().map(|c| c.state.as_str()),
        Some("Failed")
    );
    assert!(halted.failures[0].message.contains("division by zero"));
    for n in names {
        assert_eq!(history(&ns.schema(n)).await, [1, 2], "{n}");
    }
    // The canary Tenant reports the failure itself.
    let failed = halted.failures[0]
        .tenant
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    wait_tenant(&ns, &failed, "MigrationFailed", |t| {
        t.condition("MigrationsApplied")
            .is_some_and(|c| c.reason == "MigrationFailed")
    })
    .await;

    // Migration 3 ran nowhere, so it may be fixed in place: a new rollout, which completes.
    put_migrations(&ns, &[PRIORITY]).await;
    let done = wait_rollout(&ns, "the fixed set complete", |s| {
        s.completed_version == Some(3)
    })
    .await;
    assert!(!done.halted);
    assert_eq!(
        done.canary.as_ref().map(|c| c.state.as_str()),
        Some("Passed")
    );
    for n in names {
        assert_eq!(history(&ns.schema(n)).await, [1, 2, 3], "{n}");
        wait_tenant(&ns, n, "version 3 and Ready", |t| {
            version(t) == Some(3) && t.is_ready()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_is_polled_and_an_unreadable_set_is_refused() {
    let ns = TestNs::new().await;
    let dir = tempfile::tempdir().unwrap();
    let _ctl = RunningController::start_with(
        &ns,
        ControllerOpts {
            migrations: MigrationSet::embedded(),
            source: Some(MigrationSource {
                kind: SourceKind::Dir(dir.path().to_path_buf()),
                demo: true,
                poll: Duration::from_secs(1),
            }),
            ..ControllerOpts::default()
        },
    )
    .await;
    provision(&ns, &["d1", "d2"]).await;
    wait_rollout(&ns, "the demo set complete", |s| {
        s.completed_version == Some(2) && s.tenants.total == 2
    })
    .await;

    // A file that is not a migration's name: the set cannot be read, nothing changes.
    std::fs::write(dir.path().join("three.sql"), "SELECT 1;").unwrap();
    let refused = wait_rollout(&ns, "the unreadable set refused", |s| {
        s.refused.as_ref().is_some_and(|r| r.reason == "InvalidSet")
    })
    .await;
    assert!(
        refused.refused.unwrap().message.contains("three.sql"),
        "the refusal names the file"
    );
    std::fs::remove_file(dir.path().join("three.sql")).unwrap();
    std::fs::write(dir.path().join(PRIORITY.0), PRIORITY.1).unwrap();
    let done = wait_rollout(&ns, "version 3 complete", |s| {
        s.completed_version == Some(3)
    })
    .await;
    assert!(done.refused.is_none(), "{done:?}");
    assert!(done.source.starts_with("directory "), "{}", done.source);
    for n in ["d1", "d2"] {
        assert_eq!(history(&ns.schema(n)).await, [1, 2, 3], "{n}");
    }
}
