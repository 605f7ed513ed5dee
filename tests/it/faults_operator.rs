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
    /// How far the log was read, and how many lines matched, by needle.
    scanned: BTreeMap<&'static str, (u64, usize)>,
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
            scanned: BTreeMap::new(),
        }
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.into(), value.into()));
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").0.id()
    }

    /// The exit status, once the process has ended by itself.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.proc.as_mut()?.0.try_wait().unwrap()?;
        self.proc.take();
        Some(status)
    }

    /// Lines of the log (every life) that contain `needle`, reading only what is new.
    fn count(&mut self, needle: &'static str) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let (offset, seen) = self.scanned.get(needle).copied().unwrap_or_default();
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return 0;
        };
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut new = Vec::new();
        f.read_to_end(&mut new).unwrap();
        // Whole lines only: a line being written is read again next time.
        let complete = new.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&new[..complete]);
        let seen = seen + text.lines().filter(|l| l.contains(needle)).count();
        self.scanned
            .insert(needle, (offset + complete as u64, seen));
        seen
    }

    /// Waits until the log has more than `before` lines containing `needle`.
    async fn wait_log(&mut self, needle: &'static str, before: usize, timeout: Duration) {
        let start = Instant::now();
        while self.count(needle) <= before {
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} in {} after {timeout:?}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
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

    /// One life: started (unless running) and SIGKILLed at a random moment: one life in four
    /// during start-up (50–800 ms after the spawn); the others 0–500 ms after a random number
    /// (1..=`span`; with nothing left to do, 100–1500 ms after the spawn) of commits of the life, seen as changes of `probe` (a `pg_catalog` count
    /// over the namespace's objects; bound `$1`: the namespace's schema prefix), so that kills
    /// land among reconciles however fast or slow the machine is. Returns when it was
    /// killed, as text.
    async fn live_and_die(
        &mut self,
        rng: &mut StdRng,
        pg: &sqlx::PgPool,
        probe: &str,
        prefix: &str,
        span: i64,
    ) -> String {
        let progress = || async {
            sqlx::query_scalar::<_, i64>(probe)
                .bind(prefix)
                .fetch_one(pg)
                .await
                .unwrap()
        };
        let before = progress().await;
        if self.proc.is_none() {
            self.start();
        }
        let during_start = rng.random_ratio(1, 4);
        let when = if during_start {
            let delay = Duration::from_millis(rng.random_range(50..=800));
            tokio::time::sleep(delay).await;
            format!("{delay:?} after the spawn")
        } else if span <= 0 {
            // Nothing left to commit: a moment among the idle reconciles.
            let delay = Duration::from_millis(rng.random_range(100..=1500));
            tokio::time::sleep(delay).await;
            format!("{delay:?} after the spawn, nothing left to do")
        } else {
            let commits = rng.random_range(1..=span);
            let delay = Duration::from_millis(rng.random_range(0..=500));
            let waiting = Instant::now();
            let mut seen = 0;
            while seen < commits {
                if waiting.elapsed() > Duration::from_secs(10) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                seen = (progress().await - before).abs();
            }
            tokio::time::sleep(delay).await;
            format!("{delay:?} after {seen} of {commits} commits (span {span})")
        };
        self.kill();
        when
    }
}

/// Progress of provisioning and deletion: the namespace's roles, and those of them that log
/// in (a role created, dropped, or losing LOGIN changes it).
const ROLES_PROBE: &str = "SELECT count(*) + count(*) FILTER (WHERE rolcanlogin) \
     FROM pg_catalog.pg_roles WHERE pg_catalog.starts_with(rolname::text, $1)";

/// Progress of the rollout: schemas where migration 2 committed.
const ROLLOUT_PROBE: &str = "SELECT count(*) FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE pg_catalog.starts_with(n.nspname::text, $1) AND c.relname = 'second'";

/// `all` split into `lives` waves of nearly equal size (none empty while there are at least
/// as many tenants as lives).
fn waves(all: &[String], lives: usize) -> Vec<&[String]> {
    (0..lives)
        .map(|w| &all[w * all.len() / lives..(w + 1) * all.len() / lives])
        .collect()
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
    let waves = waves(&all, kills);
    let pg = pg().await;
    let prefix = ns.schema("");
    let mut mid_work = 0;
    for (i, wave) in waves.iter().enumerate() {
        for n in wave.iter() {
            ns.create(tenant(n, DeletionPolicy::Retain)).await;
        }
        let span = 3 * wave.len() as i64;
        let lived = op
            .live_and_die(&mut rng, &pg, ROLES_PROBE, &prefix, span)
            .await;
        let f = fleet(&ns).await;
        let ready = f.values().filter(|t| t.is_ready()).count();
        let schemas: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_catalog.pg_namespace WHERE pg_catalog.starts_with(nspname::text, $1)",
        )
        .bind(ns.schema(""))
        .fetch_one(&pg)
        .await
        .unwrap();
        // A Tenant with its schema but not Ready was cut off half-way.
        if schemas as usize > ready {
            mid_work += 1;
        }
        eprintln!(
            "provisioning kill {}: SIGKILL {lived}; {schemas} schemas, {ready}/{} Tenants Ready",
            i + 1,
            f.len()
        );
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
        "provisioning: {kills} SIGKILLs ({mid_work} with a Tenant half-provisioned), {tenants} Tenants \
         all Ready {took:?} after the last restart"
    );
    assert!(mid_work > 0, "no kill landed while work was outstanding");

    let expected = all.iter().map(|n| (n.clone(), Expect::Live)).collect();
    let problems = footprint_problems(&ns, &expected).await;
    eprintln!("provisioning: {} leftovers or gaps", problems.len());
    assert!(problems.is_empty(), "{problems:#?}");
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
        if i.is_multiple_of(2) {
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
    let prefix = ns.schema("");
    let mut mid_work = 0;
    let mut deleted = 0;
    for (i, wave) in waves(&all, kills).into_iter().enumerate() {
        for n in wave {
            ns.tenants()
                .delete(n, &DeleteParams::default())
                .await
                .unwrap();
        }
        deleted += wave.len();
        // A Delete tenant counts 3 (two roles, one login), a Retain one 1 (its login).
        let span = wave.len() as i64;
        let lived = op
            .live_and_die(&mut rng, &pg, ROLES_PROBE, &prefix, span)
            .await;
        let held = fleet(&ns).await.len() - (all.len() - deleted);
        if held > 0 {
            mid_work += 1;
        }
        eprintln!(
            "deletion kill {}: SIGKILL {lived}; {held} of {deleted} deleted Tenants still held by their finalizer",
            i + 1
        );
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
    let prefix = ns.schema("");
    let mut mid_work = 0;
    for i in 0..kills {
        let at_target: i64 = sqlx::query_scalar(ROLLOUT_PROBE)
            .bind(&prefix)
            .fetch_one(&pg)
            .await
            .unwrap();
        // A few schemas per life, so that the rollout spans many of them.
        let span = (schemas.len() as i64 - at_target).min(5);
        let lived = op
            .live_and_die(&mut rng, &pg, ROLLOUT_PROBE, &prefix, span)
            .await;
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
            "rollout kill {}: SIGKILL {lived}, {done}/{} schemas at version 3",
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

/// A TCP proxy that can cut traffic the way a network partition does: once cut, nothing is
/// forwarded on open connections and new ones are accepted but never answered, so a client
/// waits for its own timeout rather than getting an instant error.
struct Partition {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    if !*cut_rx.borrow() {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let cut_off = tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                            _ = cut_rx.wait_for(|c| *c) => true,
                        };
                        if !cut_off {
                            return;
                        }
                        // Both ends stay open and silent.
                        let _held = outbound;
                        std::future::pending::<()>().await;
                    }
                    let _held = inbound;
                    std::future::pending::<()>().await;
                });
            }
        });
        Self { addr, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// The server line of the test apiserver's kubeconfig, and the address in it.
fn apiserver() -> (String, std::net::SocketAddr) {
    let text = std::fs::read_to_string(&env().kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("a server line in the test kubeconfig")
        .trim()
        .to_string();
    let addr = server
        .parse()
        .expect("the test apiserver listens on an IP:port");
    (text, addr)
}

/// A kubeconfig for the test apiserver that reaches it through `via`.
fn kubeconfig_via(via: std::net::SocketAddr) -> tempfile::NamedTempFile {
    let (text, addr) = apiserver();
    let proxied = text.replace(
        &format!("server: https://{addr}"),
        &format!("server: https://{via}"),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), proxied).unwrap();
    file
}

const LEASE: &str = "tenantry-operator";

/// Waits until `identity` holds the lease; returns the Lease.
async fn wait_holder(
    leases: &Api<k8s_openapi::api::coordination::v1::Lease>,
    identity: &str,
    timeout: Duration,
) -> k8s_openapi::api::coordination::v1::Lease {
    let start = Instant::now();
    loop {
        if let Some(lease) = leases.get_opt(LEASE).await.ok().flatten() {
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
            if holder.as_deref() == Some(identity) {
                return lease;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "{identity} did not acquire the lease within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn micros(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_terminated_or_killed_hands_over_without_two_writers() {
    // Renew interval 2 s, renew deadline 4 s (a loaded machine answers a renewal slowly).
    const DURATION: Duration = Duration::from_secs(6);
    let ns = TestNs::new().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let candidate = |id: &str| {
        let mut op = Operator::new(
            &ns,
            id,
            &[
                "--leader-election",
                "--lease-namespace",
                &ns.name,
                "--lease-duration-secs",
                &DURATION.as_secs().to_string(),
            ],
        );
        op.set_env("POD_NAME", id);
        op
    };
    const STANDING_BY: &str = "standing by; another replica leads";

    // A leads with its apiserver traffic through a partition; B stands by.
    let partition = Partition::start(apiserver().1).await;
    let kubeconfig = kubeconfig_via(partition.addr);
    let mut a = candidate("op-a");
    a.set_env("KUBECONFIG", kubeconfig.path().to_str().unwrap());
    a.start();
    wait_holder(&leases, "op-a", Duration::from_secs(30)).await;
    let mut b = candidate("op-b");
    b.start();
    b.wait_log(STANDING_BY, 0, Duration::from_secs(30)).await;
    ns.create(Tenant::test("before")).await;
    wait_ready(&ns, "before").await;

    // Cut off, A must stop (it exits, so nothing of it writes any more) before B acquires.
    partition.cut();
    let cut = Instant::now();
    let a_status = loop {
        if let Some(status) = a.exited() {
            break status;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the cut-off leader did not stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let a_gone = std::time::SystemTime::now();
    let stopped = cut.elapsed();
    assert!(
        !a_status.success(),
        "a leader that lost its lease exits non-zero"
    );
    let lease = wait_holder(&leases, "op-b", Duration::from_secs(30)).await;
    let took = cut.elapsed();
    let acquired = lease.spec.unwrap().acquire_time.unwrap().0.as_microsecond();
    let margin = acquired - micros(a_gone);
    eprintln!(
        "partition: the cut-off leader stopped {stopped:?} after the cut, {margin} µs before \
         the standby acquired the lease ({took:?} after the cut)"
    );
    assert!(
        margin > 0,
        "the standby acquired the lease {} ms before the old leader stopped",
        -margin / 1000
    );
    assert!(
        took < DURATION + Duration::from_secs(3),
        "takeover took {took:?}"
    );

    // SIGTERM: B, leading and reconciling, drains and releases the lease on its way out; C
    // leads within 5 s.
    ns.create(Tenant::test("middle")).await;
    wait_ready(&ns, "middle").await;
    let mut c = candidate("op-c");
    c.start();
    c.wait_log(STANDING_BY, 0, Duration::from_secs(30)).await;
    let status = Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let termed = Instant::now();
    while b.exited().is_none() {
        assert!(
            termed.elapsed() < Duration::from_secs(10),
            "SIGTERM did not stop the leader"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holder = leases
        .get(LEASE)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity);
    assert!(
        matches!(holder.as_deref(), None | Some("op-c")),
        "the lease was not released: held by {holder:?} after the leader exited"
    );
    wait_holder(&leases, "op-c", Duration::from_secs(5)).await;
    eprintln!(
        "SIGTERM: lease released, the standby led {:?} after the signal",
        termed.elapsed()
    );

    // SIGKILL: C cannot release; D leads within the lease duration + 2 s.
    let mut d = candidate("op-d");
    d.start();
    d.wait_log(STANDING_BY, 0, Duration::from_secs(30)).await;
    c.kill();
    let killed = Instant::now();
    wait_holder(&leases, "op-d", DURATION + Duration::from_secs(2)).await;
    eprintln!(
        "SIGKILL: the standby led {:?} after the kill (lease duration {DURATION:?})",
        killed.elapsed()
    );
    ns.create(Tenant::test("after")).await;
    wait_ready(&ns, "after").await;

    // A standby stops at once on SIGTERM, and leaves the lease alone.
    let mut e = candidate("op-e");
    e.start();
    e.wait_log(STANDING_BY, 0, Duration::from_secs(30)).await;
    let status = Command::new("kill")
        .args(["-TERM", &e.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let termed = Instant::now();
    while e.exited().is_none() {
        assert!(
            termed.elapsed() < Duration::from_secs(5),
            "SIGTERM did not stop the standby"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_holder(&leases, "op-d", Duration::from_secs(1)).await;
    drop(d);
}
