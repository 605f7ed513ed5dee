//! Shared fixtures: one PostgreSQL cluster and one kube-apiserver per test binary (started by
//! `scripts/stack.sh`, or taken from TENANTRY_TEST_DATABASE_URL + TENANTRY_TEST_KUBECONFIG),
//! one random namespace per test, and an in-process controller scoped to that namespace.

pub mod proxy;
#[path = "../../support/stack.rs"]
pub mod stack;

use std::{
    future::Future,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    api::{DeleteParams, ObjectMeta, PostParams},
    Api, Client,
};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tenantry::{
    controller::{self, Settings},
    domain::crd::Tenant,
    postgres::{migrations::MigrationSet, Admin},
    telemetry::Metrics,
};
use tokio::sync::oneshot;

/// The shared stack: one PostgreSQL and one kube-apiserver per test binary.
pub type Env = stack::Stack;

use stack::kubectl_with;
pub use stack::{repo, Server};

/// The shared PostgreSQL + apiserver, started on first use; the CRD is installed.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // TENANTRY_TEST_LOG=<filter> shows the operator's logs of the tests run.
        if let Ok(filter) = std::env::var("TENANTRY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let env = match (
            std::env::var("TENANTRY_TEST_DATABASE_URL"),
            std::env::var("TENANTRY_TEST_KUBECONFIG"),
        ) {
            (Ok(database_url), Ok(kubeconfig)) => Env {
                database_url,
                kubeconfig: kubeconfig.into(),
                dir: None,
            },
            _ => stack::start("tenantry-it-"),
        };
        stack::install_crd(&env.kubeconfig);
        env
    })
}

/// The admin URL the tests' operators use. `TENANTRY_TEST_ADMIN=createrole` makes it a role
/// with only `CREATEROLE` that owns the database, as on RDS, Cloud SQL or a CloudNativePG
/// application owner (created once per test binary); otherwise (`superuser`, the default) the
/// stack's superuser. Assertions keep the superuser (`pg()`), so they see everything.
pub fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let superuser = env().database_url.clone();
        match std::env::var("TENANTRY_TEST_ADMIN").as_deref() {
            Err(_) | Ok("" | "superuser") => superuser,
            Ok("createrole") => std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(createrole_owner(&superuser))
            })
            .join()
            .expect("creating the CREATEROLE admin"),
            Ok(other) => panic!("TENANTRY_TEST_ADMIN={other}: expected superuser or createrole"),
        }
    })
}

/// The operator's admin role when it is not the stack's superuser (`TENANTRY_TEST_ADMIN`).
pub fn admin_role() -> Option<String> {
    let user = |url: &str| {
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .expect("admin URL")
            .get_username()
            .to_string()
    };
    let admin = user(admin_url());
    (admin != user(&env().database_url)).then_some(admin)
}

/// Revokes `role` from `member` as a superuser would mean it: every grant of it, whoever made
/// it. (From PostgreSQL 16 a `REVOKE` only removes the grants its current user made, and an
/// operator whose admin is not a superuser made them itself.)
pub async fn revoke_role(pg: &PgPool, role: &str, member: &str) {
    use sqlx::Executor;
    let grantors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT pg_get_userbyid(grantor)::text FROM pg_auth_members
          WHERE roleid = $1::regrole AND member = $2::regrole",
    )
    .bind(format!("\"{role}\""))
    .bind(format!("\"{member}\""))
    .fetch_all(pg)
    .await
    .unwrap();
    let mut conn = pg.acquire().await.unwrap();
    for grantor in grantors {
        conn.execute(
            format!("SET ROLE \"{grantor}\"; REVOKE \"{role}\" FROM \"{member}\"; RESET ROLE")
                .as_str(),
        )
        .await
        .unwrap();
    }
}

/// Creates a login with only `CREATEROLE`, makes it the database's owner and returns its URL.
pub async fn createrole_owner(superuser: &str) -> String {
    use sqlx::{Connection, Executor};
    let opts: sqlx::postgres::PgConnectOptions = superuser.parse().expect("admin URL");
    let db = opts.get_database().unwrap_or("postgres").to_string();
    let admin = format!("matrix_admin_{}", random_suffix());
    let password = random_suffix() + &random_suffix();
    let mut c = sqlx::PgConnection::connect(superuser)
        .await
        .expect("connect");
    c.execute(
        format!(
            "CREATE ROLE \"{admin}\" LOGIN CREATEROLE PASSWORD '{password}';
             ALTER DATABASE \"{db}\" OWNER TO \"{admin}\";"
        )
        .as_str(),
    )
    .await
    .expect("create the CREATEROLE admin");
    let (host, port) = (opts.get_host().to_string(), opts.get_port());
    eprintln!("test: the operators' admin is {admin}, CREATEROLE only, owner of {db}");
    format!("postgres://{admin}:{password}@{host}:{port}/{db}")
}

/// Runs kubectl against the test apiserver from the repository root.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    kubectl_with(&env().kubeconfig, args)
}

/// Runs kubectl and returns stdout; fails the test on a non-zero exit.
#[track_caller]
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub async fn client() -> Client {
    tenantry::cli::kube_client(Some(&env().kubeconfig), None)
        .await
        .expect("kube client")
}

/// An admin pool for assertions.
pub async fn pg() -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(&env().database_url)
        .await
        .expect("connect to test postgres")
}

/// A fresh namespace, deleted when dropped.
pub struct TestNs {
    pub name: String,
    pub client: Client,
    /// The kubeconfig of the apiserver the namespace is on.
    pub kubeconfig: PathBuf,
}

impl TestNs {
    pub async fn new() -> Self {
        Self::new_on(client().await, env().kubeconfig.clone()).await
    }

    /// A fresh namespace on another apiserver (a stack of a test's own).
    pub async fn new_on(client: Client, kubeconfig: PathBuf) -> Self {
        let name = format!("t-{}", random_suffix());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Self {
            name,
            client,
            kubeconfig,
        }
    }

    pub fn tenants(&self) -> Api<Tenant> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// The schema name the operator derives for `tenant` in this namespace.
    pub fn schema(&self, tenant: &str) -> String {
        tenantry::domain::naming::default_schema_name(&self.name, tenant)
    }

    pub async fn create(&self, tenant: Tenant) -> Tenant {
        self.tenants()
            .create(&PostParams::default(), &tenant)
            .await
            .expect("create tenant")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // Namespaces hold Tenants with finalizers; deleting is best effort, the stack is
        // thrown away with the test binary.
        let _ = kubectl_with(
            &self.kubeconfig,
            &["delete", "namespace", &self.name, "--wait=false"],
        );
    }
}

pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..8)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

/// The gateway role of the test operator for `ns` (one per namespace, so parallel tests do
/// not fight over its password).
pub fn gateway_role(ns: &TestNs) -> String {
    format!("gw_{}", ns.name.replace('-', "_"))
}

/// The platform signing-key Secret of the test operator and API, in the test's namespace.
pub const SIGNING_KEY_SECRET: &str = "tenantry-signing-key";
/// The API base domain of the tests: `<tenant>.tenants.test` routes to a tenant.
pub const BASE_DOMAIN: &str = "tenants.test";

/// The TenantRollout of the test operator, in the test's namespace.
pub const ROLLOUT: &str = "tenantry";

/// An operator running inside the test, watching one namespace.
pub struct RunningController {
    stop: Option<oneshot::Sender<()>>,
    pub metrics: Metrics,
    task: tokio::task::JoinHandle<()>,
}

/// The label that ties a test's PostgresServers to its namespace's controller.
pub const SERVER_LABEL: &str = "tenantry.dev/test-namespace";

pub struct ControllerOpts {
    pub database_url: String,
    pub migrations: MigrationSet,
    pub rollout: tenantry::controller::RolloutPolicy,
    /// How often the operator measures storage usage (an hour unless a test needs it: a
    /// measurement writes every tenant's status.usage).
    pub usage_interval: Duration,
    /// How often the operator scans for schema drift (never unless a test needs it: the first
    /// scan writes every tenant's SchemaDrift condition).
    pub drift_interval: Duration,
    /// A migration source watched for changes (`migrations` must be what it holds at start).
    pub source: Option<tenantry::controller::MigrationSource>,
    /// How long a Ready tenant waits for its next full verification (`--resync-secs`).
    pub resync: Duration,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        Self {
            database_url: admin_url().to_string(),
            migrations: MigrationSet::embedded(),
            rollout: Default::default(),
            usage_interval: Duration::from_secs(3600),
            drift_interval: Duration::ZERO,
            source: None,
            resync: tenantry::controller::RESYNC,
        }
    }
}

impl RunningController {
    pub async fn start(ns: &TestNs) -> Self {
        Self::start_with(ns, ControllerOpts::default()).await
    }

    pub async fn start_with(ns: &TestNs, opts: ControllerOpts) -> Self {
        let gateway = gateway_role(ns);
        let admin = Admin::new(&opts.database_url, 4, None, None)
            .expect("admin options")
            .with_gateway(Some(
                tenantry::domain::naming::Ident::parse_role(&gateway).unwrap(),
            ));
        let metrics = Metrics::default();
        let (tx, rx) = oneshot::channel::<()>();
        let settings = Settings {
            namespaces: vec![ns.name.clone()],
            concurrency: 4,
            health_addr: "127.0.0.1:0".parse().unwrap(),
            gateway_secret: Some((ns.name.clone(), "tenantry-gateway".into())),
            signing_key: (ns.name.clone(), SIGNING_KEY_SECRET.into()),
            base_domain: Some(BASE_DOMAIN.into()),
            leader: None,
            rollout: opts.rollout,
            usage_interval: opts.usage_interval,
            drift_interval: opts.drift_interval,
            resync: opts.resync,
            migration_source: opts.source,
            // The rollout is reported on the TenantRollout `tenantry` of the test's namespace.
            rollout_object: Some((ns.name.clone(), ROLLOUT.into())),
            default_server: "default".into(),
            // PostgresServers are cluster-scoped: each test's controller sees only its own.
            server_selector: format!("{SERVER_LABEL}={}", ns.name),
        };
        let client = ns.client.clone();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) =
                controller::run(client, admin, opts.migrations, settings, m, shutdown).await
            {
                panic!("controller failed: {e:#}");
            }
        });
        Self {
            stop: Some(tx),
            metrics,
            task,
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails the test after `timeout`.
#[track_caller]
pub fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> impl Future<Output = T> + '_
where
    F: FnMut() -> Fut + 'static,
    Fut: Future<Output = Option<T>>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!("{caller}: timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until the Tenant satisfies `pred`, returning it.
#[track_caller]
pub fn wait_tenant<'a>(
    ns: &'a TestNs,
    name: &'a str,
    what: &'a str,
    pred: impl Fn(&Tenant) -> bool + Send + 'static,
) -> impl Future<Output = Tenant> + 'a {
    let api = ns.tenants();
    let name = name.to_string();
    let pred = std::sync::Arc::new(pred);
    eventually(what, Duration::from_secs(60), move || {
        let api = api.clone();
        let name = name.clone();
        let pred = pred.clone();
        async move { api.get_opt(&name).await.ok().flatten().filter(|t| pred(t)) }
    })
}

/// Waits until the Tenant is Ready.
#[track_caller]
pub fn wait_ready<'a>(ns: &'a TestNs, name: &'a str) -> impl Future<Output = Tenant> + 'a {
    wait_tenant(ns, name, "tenant Ready", |t| t.is_ready())
}

/// Waits until the Tenant no longer exists.
pub async fn wait_gone(ns: &TestNs, name: &str) {
    let api = ns.tenants();
    let name = name.to_string();
    eventually("tenant gone", Duration::from_secs(60), move || {
        let api = api.clone();
        let name = name.clone();
        async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
    })
    .await
}

pub async fn delete_tenant(ns: &TestNs, name: &str) {
    ns.tenants()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete tenant");
}

/// A string value of a Secret.
pub fn secret_value(s: &Secret, key: &str) -> String {
    let bytes = &s.data.as_ref().expect("secret data")[key].0;
    String::from_utf8(bytes.clone()).expect("utf-8 secret value")
}

/// Events recorded for a Tenant, as (type, reason, note).
pub async fn events(ns: &TestNs, name: &str) -> Vec<(String, String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let list = api.list(&Default::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// A child process killed when the guard drops (operators and APIs run as binaries).
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Python with helm-python-sdk that `scripts/setup.sh` installs (or TENANTRY_HELM_PYTHON).
pub fn helm_python() -> PathBuf {
    std::env::var_os("TENANTRY_HELM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/tenantry/helm-venv/bin/python")
        })
}
