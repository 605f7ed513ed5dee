//! Faults of the operator process itself: the `tenantry controller` binary SIGKILLed at random
//! moments while Tenants are provisioned, while they are deleted under both policies and while
//! a new migration set rolls out, restarted each time. Afterwards PostgreSQL holds exactly what
//! the Tenants say (one helper reads it from `pg_catalog`: [`footprint_problems`]).
//!
//! The kill schedule comes from a seeded RNG; the seed is printed and `TENANTRY_FAULT_SEED`
//! replays it. `TENANTRY_SOAK=1` runs more tenants and more kills.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kube::{api::DeleteParams, Api, ResourceExt};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sqlx::{Connection, PgConnection};
use tenantry::domain::{
    crd::{DeletionPolicy, Tenant},
    naming::{owner_role, Ident},
    rollout::TenantRollout,
    state::Owner,
};

use crate::common::*;

/// Tenants and kills of one scenario: the issue's figures, or a soak.
struct Scale {
    tenants: usize,
    kills: usize,
}

fn scale() -> Scale {
    if std::env::var("TENANTRY_SOAK").is_ok_and(|v| v == "1") {
        Scale {
            tenants: 150,
            kills: 60,
        }
    } else {
        Scale {
            tenants: 50,
            kills: 20,
        }
    }
}

/// The kill schedule's RNG; its seed is printed so that a failure can be replayed.
fn schedule(what: &str) -> StdRng {
    let seed: u64 = std::env::var("TENANTRY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{what}: kill schedule seed {seed} (TENANTRY_FAULT_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// The operator binary, started and SIGKILLed again and again; every life appends to one log.
struct Operator {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Operator {
    /// An operator of `ns` (its gateway role, signing key, TenantRollout and Lease live there)
    /// with `extra` flags.
    fn new(ns: &TestNs, tag: &str, extra: &[&str]) -> Self {
        let env = env();
        let mut args: Vec<String> = [
            "controller",
            "--namespace",
            &ns.name,
            "--health-addr",
            "127.0.0.1:0",
            "--gateway-role",
            &gateway_role(ns),
            "--gateway-secret-namespace",
            &ns.name,
            "--signing-key-secret-namespace",
            &ns.name,
            "--drift-interval-secs",
            "0",
            "--usage-interval-secs",
            "3600",
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self {
            args,
            envs: vec![
                ("DATABASE_URL".into(), env.database_url.clone()),
                (
                    "KUBECONFIG".into(),
                    env.kubeconfig.to_string_lossy().into_owned(),
                ),
                ("POD_NAMESPACE".into(), ns.name.clone()),
            ],
            log: std::env::temp_dir().join(format!("tenantry-faults-{tag}-{}.log", ns.name)),
            proc: None,
        }
    }

    fn start(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tenantry controller");
        self.proc = Some(Proc(child));
    }

    /// SIGKILL (dropping the guard kills and reaps the process).
    fn kill(&mut self) {
        self.proc.take();
    }

    /// One life: started (unless running), SIGKILLed after a random 100–1500 ms.
    async fn live_and_die(&mut self, rng: &mut StdRng) -> Duration {
        if self.proc.is_none() {
            self.start();
        }
        let delay = Duration::from_millis(rng.random_range(100..=1500));
        tokio::time::sleep(delay).await;
        self.kill();
        delay
    }
}

/// The migration set of these tests, as a directory.
fn migrations_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_migrations(dir.path(), files);
    dir
}

fn write_migrations(dir: &Path, files: &[(&str, &str)]) {
    for (name, sql) in files {
        // Renamed into place: a poll never reads half a file.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, sql).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// Version 1: a table the tenants keep data in, and one row per later migration run.
const BASE: (&str, &str) = (
    "1_base.sql",
    "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);\n\
     CREATE TABLE runs (version int NOT NULL);",
);

fn tenant(name: &str, policy: DeletionPolicy) -> Tenant {
    let mut t = Tenant::test(name);
    t.spec.deletion_policy = policy;
    t
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

/// Polls the namespace's Tenants every 200 ms until `done` holds for the list (by name),
/// failing after `timeout`; returns how long it took.
async fn wait_fleet(
    ns: &TestNs,
    what: &str,
    timeout: Duration,
    done: impl Fn(&BTreeMap<String, Tenant>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let fleet = fleet(ns).await;
        if done(&fleet) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let not: Vec<_> = fleet
                .values()
                .filter(|t| !t.is_ready())
                .map(|t| {
                    format!(
                        "{} {:?}",
                        t.name_any(),
                        t.status.as_ref().map(|s| (
                            &s.phase,
                            s.conditions
                                .iter()
                                .find(|c| c.type_ == "Ready")
                                .map(|c| (&c.reason, &c.message))
                        ))
                    )
                })
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; {} Tenants left, not Ready: {not:?}",
                fleet.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fleet(ns: &TestNs) -> BTreeMap<String, Tenant> {
    ns.tenants()
        .list(&Default::default())
        .await
        .expect("list tenants")
        .items
        .into_iter()
        .map(|t| (t.name_any(), t))
        .collect()
}

fn all_ready(n: usize) -> impl Fn(&BTreeMap<String, Tenant>) -> bool {
    move |f| f.len() == n && f.values().all(Tenant::is_ready)
}

/// What a Tenant should have left in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The Tenant exists: its schema, its app role (LOGIN) and its owner role, each marked
    /// with the Tenant's namespace, name and uid.
    Live,
    /// Deleted with `Retain`: the schema and both roles kept, still marked; the app role
    /// cannot log in.
    Retained,
    /// Deleted with `Delete`: nothing.
    Gone,
}

/// Everything that differs between PostgreSQL and `expected` for the Tenants of `ns`: a
/// schema or role named after the namespace's tenants or carrying a tenantry mark of the
/// namespace that no expected Tenant accounts for (a leftover, a duplicate, an orphan), an
/// expected one missing, a mark naming another Tenant (or an older uid), a LOGIN where none
/// belongs. Empty when PostgreSQL holds exactly what the Tenants say. Reads `pg_catalog` only.
async fn footprint_problems(ns: &TestNs, expected: &BTreeMap<String, Expect>) -> Vec<String> {
    let pg = pg().await;
    let prefix = ns.schema("");
    let uids: BTreeMap<String, String> = fleet(ns)
        .await
        .into_iter()
        .map(|(n, t)| (n, t.uid().unwrap_or_default()))
        .collect();
    let ours = |name: &str, comment: Option<&str>| {
        name.starts_with(&prefix) || Owner::parse(comment).is_some_and(|o| o.namespace == ns.name)
    };
    // kind, name → (LOGIN, mark)
    let mut found: BTreeMap<(&str, String), (bool, Option<Owner>)> = BTreeMap::new();
    let schemas: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT n.nspname::text, pg_catalog.obj_description(n.oid, 'pg_namespace') \
         FROM pg_catalog.pg_namespace n",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    for (name, comment) in schemas {
        if ours(&name, comment.as_deref()) {
            found.insert(("schema", name), (false, Owner::parse(comment.as_deref())));
        }
    }
    let roles: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT r.rolname::text, r.rolcanlogin, pg_catalog.shobj_description(r.oid, 'pg_authid') \
         FROM pg_catalog.pg_roles r",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    for (name, login, comment) in roles {
        if ours(&name, comment.as_deref()) {
            found.insert(("role", name), (login, Owner::parse(comment.as_deref())));
        }
    }
    let mut problems = Vec::new();
    for (tenant, expect) in expected {
        let schema = ns.schema(tenant);
        let owner = owner_role(&Ident::parse("schema", &schema).unwrap())
            .as_str()
            .to_string();
        // (kind, name, LOGIN wanted)
        let want: Vec<(&str, String, bool)> = match expect {
            Expect::Gone => vec![],
            Expect::Live => vec![
                ("schema", schema.clone(), false),
                ("role", schema.clone(), true),
                ("role", owner, false),
            ],
            Expect::Retained => vec![
                ("schema", schema.clone(), false),
                ("role", schema.clone(), false),
                ("role", owner, false),
            ],
        };
        for (kind, name, login) in want {
            let Some((has_login, mark)) = found.remove(&(kind, name.clone())) else {
                problems.push(format!("{tenant} ({expect:?}): {kind} {name} is missing"));
                continue;
            };
            if has_login != login {
                problems.push(format!(
                    "{tenant} ({expect:?}): {kind} {name} has LOGIN {has_login}, wanted {login}"
                ));
            }
            let mark_ok = mark.as_ref().is_some_and(|m| {
                m.namespace == ns.name
                    && &m.name == tenant
                    && (*expect != Expect::Live || uids.get(tenant) == Some(&m.uid))
            });
            if !mark_ok {
                problems.push(format!(
                    "{tenant} ({expect:?}): {kind} {name} carries mark {mark:?}, uid now {:?}",
                    uids.get(tenant)
                ));
            }
        }
    }
    for ((kind, name), (_, mark)) in found {
        problems.push(format!(
            "leftover {kind} {name} (mark {mark:?}) that no Tenant accounts for"
        ));
    }
    problems
}

/// Every Tenant's Secret logs in as its app role, which reaches its tables; the gateway's
/// Secret logs in too.
async fn every_secret_logs_in(ns: &TestNs, fleet: &BTreeMap<String, Tenant>) {
    for (name, t) in fleet {
        let secret = ns
            .secrets()
            .get(&t.secret_name())
            .await
            .unwrap_or_else(|e| panic!("{name}: Secret {}: {e}", t.secret_name()));
        let mut conn = PgConnection::connect(&secret_value(&secret, "uri"))
            .await
            .unwrap_or_else(|e| panic!("{name}: the Secret's password does not log in: {e}"));
        let (user, _items): (String, i64) =
            sqlx::query_as("SELECT current_user::text, (SELECT count(*) FROM items)")
                .fetch_one(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(user, ns.schema(name));
        conn.close().await.unwrap();
    }
    let gateway = ns.secrets().get("tenantry-gateway").await.unwrap();
    PgConnection::connect(&secret_value(&gateway, "uri"))
        .await
        .expect("the gateway Secret's password logs in")
        .close()
        .await
        .unwrap();
}

/// The history of `schema` (versions, in order).
async fn history(pg: &sqlx::PgPool, schema: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM \"{schema}\".tenantry_migrations ORDER BY version"
    ))
    .fetch_all(pg)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_while_provisioning_every_tenant_converges_with_no_orphan() {
    let Scale { tenants, kills } = scale();
    let ns = TestNs::new().await;
    let mut rng = schedule("provisioning");
    let dir = migrations_dir(&[BASE]);
    let mut op = Operator::new(
        &ns,
        "provision",
        &["--migrations-dir", dir.path().to_str().unwrap()],
    );
    // The Tenants arrive in waves, one before each start, so that every life has work.
    let all = names("p", tenants);
    let waves: Vec<&[String]> = all.chunks(tenants.div_ceil(kills)).collect();
    let mut mid_work = 0;
    for i in 0..kills {
        for n in waves.get(i).copied().unwrap_or_default() {
            ns.create(tenant(n, DeletionPolicy::Retain)).await;
        }
        let lived = op.live_and_die(&mut rng).await;
        let f = fleet(&ns).await;
        let ready = f.values().filter(|t| t.is_ready()).count();
        if ready < f.len() {
            mid_work += 1;
        }
        eprintln!(
            "provisioning kill {}: SIGKILL after {lived:?}, {ready}/{} Ready",
            i + 1,
            f.len()
        );
    }
    for n in waves.iter().skip(kills).flat_map(|w| w.iter()) {
        ns.create(tenant(n, DeletionPolicy::Retain)).await;
    }
    op.start();
    let took = wait_fleet(
        &ns,
        "every Tenant Ready",
        Duration::from_secs(90),
        all_ready(tenants),
    )
    .await;
    eprintln!(
        "provisioning: {kills} SIGKILLs ({mid_work} with Tenants not Ready), {tenants} Tenants \
         all Ready {took:?} after the last restart"
    );
    assert!(mid_work > 0, "no kill landed while work was outstanding");

    let expected = all.iter().map(|n| (n.clone(), Expect::Live)).collect();
    let problems = footprint_problems(&ns, &expected).await;
    eprintln!("provisioning: {} leftovers or gaps", problems.len());
    assert!(problems.is_empty(), "{problems:#?}");
    let pg = pg().await;
    for n in &all {
        assert_eq!(history(&pg, &ns.schema(n)).await, [1], "{n}: migrated once");
    }
    every_secret_logs_in(&ns, &fleet(&ns).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_while_deleting_finalizers_are_released_and_each_policy_holds() {
    let Scale { tenants, kills } = scale();
    let ns = TestNs::new().await;
    let mut rng = schedule("deletion");
    let dir = migrations_dir(&[BASE]);
    let mut op = Operator::new(
        &ns,
        "delete",
        &["--migrations-dir", dir.path().to_str().unwrap()],
    );
    let all = names("d", tenants);
    let policy = |i: usize| {
        if i % 2 == 0 {
            DeletionPolicy::Delete
        } else {
            DeletionPolicy::Retain
        }
    };
    op.start();
    for (i, n) in all.iter().enumerate() {
        ns.create(tenant(n, policy(i))).await;
    }
    wait_fleet(
        &ns,
        "every Tenant Ready",
        Duration::from_secs(90),
        all_ready(tenants),
    )
    .await;
    op.kill();
    let pg = pg().await;
    for n in &all {
        sqlx::query(&format!(
            "INSERT INTO \"{}\".items VALUES (1, 'kept')",
            ns.schema(n)
        ))
        .execute(&pg)
        .await
        .unwrap();
    }

    // Deleted in waves, one before each start.
    let waves: Vec<&[String]> = all.chunks(tenants.div_ceil(kills)).collect();
    let mut mid_work = 0;
    for i in 0..kills {
        for n in waves.get(i).copied().unwrap_or_default() {
            ns.tenants()
                .delete(n, &DeleteParams::default())
                .await
                .unwrap();
        }
        let lived = op.live_and_die(&mut rng).await;
        let left = fleet(&ns).await.len();
        let deleted = all.len().min((i + 1) * tenants.div_ceil(kills));
        if left > all.len() - deleted {
            mid_work += 1;
        }
        eprintln!(
            "deletion kill {}: SIGKILL after {lived:?}, {} of {deleted} deleted Tenants still held by their finalizer",
            i + 1,
            left - (all.len() - deleted)
        );
    }
    for n in waves.iter().skip(kills).flat_map(|w| w.iter()) {
        ns.tenants()
            .delete(n, &DeleteParams::default())
            .await
            .unwrap();
    }
    op.start();
    let took = wait_fleet(&ns, "every Tenant gone", Duration::from_secs(90), |f| {
        f.is_empty()
    })
    .await;
    eprintln!(
        "deletion: {kills} SIGKILLs ({mid_work} with finalizers outstanding), {tenants} Tenants \
         gone {took:?} after the last restart"
    );
    assert!(mid_work > 0, "no kill landed while work was outstanding");

    let expected = all
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let e = match policy(i) {
                DeletionPolicy::Delete => Expect::Gone,
                DeletionPolicy::Retain => Expect::Retained,
            };
            (n.clone(), e)
        })
        .collect();
    let problems = footprint_problems(&ns, &expected).await;
    eprintln!("deletion: {} leftovers or gaps", problems.len());
    assert!(problems.is_empty(), "{problems:#?}");
    for (i, n) in all.iter().enumerate() {
        if policy(i) == DeletionPolicy::Retain {
            let note: String = sqlx::query_scalar(&format!(
                "SELECT note FROM \"{}\".items WHERE id = 1",
                ns.schema(n)
            ))
            .fetch_one(&pg)
            .await
            .unwrap_or_else(|e| panic!("{n}: retained data: {e}"));
            assert_eq!(note, "kept");
        }
        assert!(
            ns.secrets()
                .get_opt(&format!("{n}-db"))
                .await
                .unwrap()
                .is_none(),
            "{n}: the Secret went with its Tenant"
        );
    }
}

/// The set rolled out under kills: 2 is slow (so that kills land inside it), and neither
/// migration may run twice: `CREATE TABLE` without `IF NOT EXISTS` fails a second run, and
/// each adds its row to `runs`.
const ROLLOUT_SET: [(&str, &str); 2] = [
    (
        "2_second.sql",
        "CREATE TABLE second (id int PRIMARY KEY);\n\
         INSERT INTO runs VALUES (2);\n\
         SELECT pg_sleep(0.15);",
    ),
    (
        "3_third.sql",
        "CREATE TABLE third (id int PRIMARY KEY);\nINSERT INTO runs VALUES (3);",
    ),
];

/// One schema's migration state: the history, the `runs` rows, and which of the tables of
/// 2 and 3 exist.
#[derive(Debug, PartialEq, Eq)]
struct Migrated {
    history: Vec<i64>,
    runs: Vec<i64>,
    second: bool,
    third: bool,
}

impl Migrated {
    /// History and objects agree: each migration's table and `runs` row exist exactly when
    /// its history row does.
    fn consistent(&self) -> bool {
        let recorded = |v| self.history.contains(&v);
        let mut later: Vec<i64> = self.history.iter().copied().filter(|v| *v > 1).collect();
        later.sort();
        let mut runs = self.runs.clone();
        runs.sort();
        self.history.first() == Some(&1)
            && runs == later
            && self.second == recorded(2)
            && self.third == recorded(3)
    }
}

async fn migrated(pg: &sqlx::PgPool, schemas: &[String]) -> BTreeMap<String, Migrated> {
    let mut out = BTreeMap::new();
    for s in schemas {
        let (history, runs, second, third): (Vec<i64>, Vec<i32>, bool, bool) =
            sqlx::query_as(&format!(
                "SELECT (SELECT coalesce(array_agg(version ORDER BY version), '{{}}') \
                           FROM \"{s}\".tenantry_migrations), \
                        (SELECT coalesce(array_agg(version ORDER BY version), '{{}}') \
                           FROM \"{s}\".runs), \
                        pg_catalog.to_regclass('\"{s}\".second') IS NOT NULL, \
                        pg_catalog.to_regclass('\"{s}\".third') IS NOT NULL"
            ))
            .fetch_one(pg)
            .await
            .unwrap();
        out.insert(
            s.clone(),
            Migrated {
                history,
                runs: runs.into_iter().map(i64::from).collect(),
                second,
                third,
            },
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_during_a_rollout_no_tenant_is_half_or_twice_migrated() {
    let Scale { tenants, kills } = scale();
    let ns = TestNs::new().await;
    let mut rng = schedule("rollout");
    let dir = migrations_dir(&[BASE]);
    let mut op = Operator::new(
        &ns,
        "rollout",
        &[
            "--migrations-dir",
            dir.path().to_str().unwrap(),
            "--migrations-poll-secs",
            "1",
            "--db-max-connections",
            "4",
        ],
    );
    let all = names("r", tenants);
    op.start();
    for n in &all {
        ns.create(tenant(n, DeletionPolicy::Retain)).await;
    }
    wait_fleet(
        &ns,
        "every Tenant Ready",
        Duration::from_secs(90),
        all_ready(tenants),
    )
    .await;
    let schemas: Vec<String> = all.iter().map(|n| ns.schema(n)).collect();
    let pg = pg().await;

    // The running operator picks the new set up from its directory; it and every later life
    // are killed while the set rolls out.
    write_migrations(dir.path(), &ROLLOUT_SET);
    let mut mid_work = 0;
    for i in 0..kills {
        let lived = op.live_and_die(&mut rng).await;
        let states = migrated(&pg, &schemas).await;
        let half: Vec<_> = states.iter().filter(|(_, m)| !m.consistent()).collect();
        assert!(
            half.is_empty(),
            "after kill {}: history and objects disagree: {half:#?}",
            i + 1
        );
        let done = states.values().filter(|m| m.history == [1, 2, 3]).count();
        if done < schemas.len() {
            mid_work += 1;
        }
        eprintln!(
            "rollout kill {}: SIGKILL after {lived:?}, {done}/{} schemas at version 3",
            i + 1,
            schemas.len()
        );
    }
    op.start();
    let restarted = Instant::now();
    let rollouts: Api<TenantRollout> = Api::namespaced(ns.client.clone(), &ns.name);
    loop {
        let status = rollouts
            .get_opt(ROLLOUT)
            .await
            .unwrap()
            .and_then(|r| r.status);
        if status
            .as_ref()
            .is_some_and(|s| s.completed_version == Some(3) && s.phase == "Complete")
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(90),
            "the rollout did not complete: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = restarted.elapsed();
    wait_fleet(
        &ns,
        "every Tenant Ready at version 3",
        Duration::from_secs(60),
        move |f| {
            f.len() == tenants
                && f.values().all(|t| {
                    t.is_ready() && t.status.as_ref().and_then(|s| s.migration_version) == Some(3)
                })
        },
    )
    .await;
    eprintln!(
        "rollout: {kills} SIGKILLs ({mid_work} mid-rollout), the TenantRollout Complete {took:?} \
         after the last restart"
    );
    assert!(
        mid_work > 0,
        "no kill landed while the rollout was under way"
    );
    let states = migrated(&pg, &schemas).await;
    for (s, m) in &states {
        assert_eq!(
            m,
            &Migrated {
                history: vec![1, 2, 3],
                runs: vec![2, 3],
                second: true,
                third: true,
            },
            "{s}"
        );
    }
    let expected = all.iter().map(|n| (n.clone(), Expect::Live)).collect();
    let problems = footprint_problems(&ns, &expected).await;
    eprintln!("rollout: {} leftovers or gaps", problems.len());
    assert!(problems.is_empty(), "{problems:#?}");
}
