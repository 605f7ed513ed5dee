//! The `tenantry` command line: flags with environment fallbacks, and the wiring of each
//! subcommand to the library.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::{config::KubeConfigOptions, Client, Config, CustomResourceExt};

use crate::{
    controller,
    domain::{crd::Tenant, credentials, naming::Ident},
    postgres::{migrations::MigrationSet, Admin},
    telemetry::{self, LogFormat},
};

#[derive(Debug, Parser)]
#[command(
    name = "tenantry",
    version,
    about = "Schema-per-tenant PostgreSQL on Kubernetes"
)]
pub struct Cli {
    /// Log filter: a level (`info`, `debug`) or EnvFilter directives (`tenantry=debug,kube=info`).
    #[arg(long, env = "TENANTRY_LOG", default_value = "info", global = true)]
    pub log_level: String,

    /// Log output format.
    #[arg(
        long,
        env = "TENANTRY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Tenant operator.
    Controller(Box<ControllerArgs>),
    /// Run the tenant-aware data API.
    Api(Box<ApiArgs>),
    /// Print a CustomResourceDefinition as YAML: the Tenant's (default) or the
    /// TenantRollout's.
    Crd {
        #[arg(value_enum, default_value_t = CrdKind::Tenant)]
        kind: CrdKind,
    },
    /// Mint a JWT for a tenant's users, signed with the tenant's key from its credentials
    /// Secret (for development and for platforms that issue tenant tokens).
    Token(TokenArgs),
    /// Check a tenant migration set: lint it, or plan it against the live fleet.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
}

#[derive(Debug, Subcommand)]
pub enum MigrationsCommand {
    /// Print the lint findings of a migration set; exits non-zero when there is any.
    Lint(SetArgs),
    /// Print, per tenant of the database, which migrations the set would run (or why it would
    /// refuse the tenant), a summary and the lint findings. Writes nothing: every read runs in
    /// a READ ONLY transaction.
    Plan(PlanArgs),
}

/// The migration set, chosen as the controller chooses it.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Directory of tenant migrations (`<version>_<name>.sql`), as the controller's flag.
    #[arg(long, env = "TENANTRY_MIGRATIONS_DIR")]
    pub migrations_dir: Option<PathBuf>,

    /// Read the set from this ConfigMap instead, as the controller's flag (`NAME` in the
    /// kubeconfig's namespace, or `NAMESPACE/NAME`).
    #[arg(
        long,
        env = "TENANTRY_MIGRATIONS_CONFIGMAP",
        conflicts_with = "migrations_dir"
    )]
    pub migrations_configmap: Option<String>,

    /// Include the demo migration set first, as the controller's flag.
    #[arg(long, env = "TENANTRY_DEMO_MIGRATIONS")]
    pub demo_migrations: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub set: SetArgs,

    /// Admin connection to the tenants' database, as the controller's flag.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: crate::postgres::plan::Output,

    /// Also list the Tenants (all namespaces) through the Kubernetes API: match each schema
    /// with its Tenant and its status, and report Tenants not provisioned yet. Without it the
    /// plan reads the database alone (tenants are named by their schemas' ownership marks).
    #[arg(long)]
    pub kubernetes: bool,

    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Which CustomResourceDefinition `tenantry crd` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CrdKind {
    /// `crds/tenant.yaml`.
    Tenant,
    /// `crds/tenantrollout.yaml`.
    Tenantrollout,
    /// `crds/postgresserver.yaml`.
    Postgresserver,
}

/// Where the platform signing key lives: the operator creates it, the API reads it (that one
/// Secret only) and derives every tenant's token key from it.
#[derive(Debug, Args)]
pub struct SigningKeyArgs {
    /// Secret holding the platform key (key `key`) every tenant's token signing key is derived
    /// from. The operator creates it with a random key when missing.
    #[arg(
        long,
        env = "TENANTRY_SIGNING_KEY_SECRET",
        default_value = "tenantry-signing-key"
    )]
    pub signing_key_secret: String,

    /// Namespace of that Secret (default: POD_NAMESPACE, else the kubeconfig namespace).
    #[arg(long, env = "TENANTRY_SIGNING_KEY_SECRET_NAMESPACE")]
    pub signing_key_secret_namespace: Option<String>,
}

impl SigningKeyArgs {
    /// (namespace, name) of the Secret, for a client whose default namespace applies.
    pub fn locate(&self, client: &Client) -> (String, String) {
        let ns = self
            .signing_key_secret_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| client.default_namespace().to_string());
        (ns, self.signing_key_secret.clone())
    }
}

/// How to reach the Kubernetes API.
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// Kubeconfig file; without it the usual inference applies (KUBECONFIG, ~/.kube/config,
    /// in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

impl KubeArgs {
    pub async fn client(&self) -> anyhow::Result<Client> {
        kube_client(self.kubeconfig.as_ref(), self.context.as_deref()).await
    }
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Admin connection to the tenants' database (a role with CREATEROLE, or a superuser).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub signing_key: SigningKeyArgs,

    /// The API's base domain: `<name>.<base domain>` belongs to the Tenant called `<name>`, and
    /// the Routable condition says so when another Tenant lists that host.
    #[arg(long, env = "TENANTRY_BASE_DOMAIN")]
    pub base_domain: Option<String>,

    /// Watch Tenants in this namespace only (default: all namespaces). Repeat the flag, or
    /// separate names with commas, to watch several: one watch per namespace, which namespaced
    /// Roles allow.
    #[arg(long = "namespace", env = "TENANTRY_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Directory of tenant migrations (`<version>_<name>.sql`). Without it and without
    /// --demo-migrations the set is empty: tenants get an empty schema.
    #[arg(long, env = "TENANTRY_MIGRATIONS_DIR")]
    pub migrations_dir: Option<PathBuf>,

    /// ConfigMap whose `*.sql` keys are the tenant migrations, as NAME or NAMESPACE/NAME
    /// (default namespace: the operator's). Watched: a change starts a rollout, no restart
    /// needed. Exclusive with --migrations-dir.
    #[arg(
        long,
        env = "TENANTRY_MIGRATIONS_CONFIGMAP",
        conflicts_with = "migrations_dir"
    )]
    pub migrations_configmap: Option<String>,

    /// Seconds between two reads of --migrations-dir: a changed set starts a rollout.
    #[arg(long, env = "TENANTRY_MIGRATIONS_POLL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub migrations_poll_secs: u64,

    /// The TenantRollout object, in the operator's namespace, that reports the rollout of the
    /// migration set (created when missing). Empty: report in logs and metrics only.
    #[arg(long, env = "TENANTRY_ROLLOUT_NAME", default_value = "tenantry")]
    pub rollout_name: String,

    /// Include the demo migration set (members, projects, tasks) built into the binary, before
    /// the --migrations-dir set when both are given (which is how tenants provisioned with the
    /// demo set adopt a set of their own: number its migrations from 3).
    #[arg(long, env = "TENANTRY_DEMO_MIGRATIONS")]
    pub demo_migrations: bool,

    /// Tenants reconciled in parallel.
    #[arg(long, env = "TENANTRY_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Size of the admin connection pool.
    #[arg(long, env = "TENANTRY_DB_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// Concurrent sessions each tenant's login role may open (-1: unlimited), so that one
    /// tenant cannot take every connection of the server.
    #[arg(long, env = "TENANTRY_TENANT_CONNECTION_LIMIT", default_value_t = crate::postgres::DEFAULT_TENANT_CONNECTION_LIMIT, value_parser = clap::value_parser!(i32).range(-1..=10000))]
    pub tenant_connection_limit: i32,

    /// Seconds between two measurements of the whole fleet's storage usage (status.usage,
    /// storage quotas, the tenantry_tenant_storage_bytes metric): one catalog query per 100
    /// tenant schemas.
    #[arg(long, env = "TENANTRY_USAGE_INTERVAL_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub usage_interval_secs: u64,

    /// Seconds between two schema drift scans of the whole fleet (the SchemaDrift condition,
    /// the tenantry_schema_drift_tenants metric): one catalog query for every tenant
    /// schema's fingerprint; 0 turns drift detection off.
    #[arg(long, env = "TENANTRY_DRIFT_INTERVAL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub drift_interval_secs: u64,

    /// Seconds a tenant waits at most for its next full verification against PostgreSQL and
    /// its Secret (changes to the Tenant or its Secret are acted on at once; a conflict or a
    /// failed migration is looked at again after 5 or 10 minutes when that is sooner): a role,
    /// the schema or the migration history dropped out of band, or an ownership mark edited,
    /// is found then at the latest.
    #[arg(long, env = "TENANTRY_RESYNC_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub resync_secs: u64,

    /// The name the server of --database-url goes by: in Tenants' `status.server` and
    /// `spec.placement.server`. A PostgresServer of this name is refused. Tenants provisioned
    /// before servers were recorded live there.
    #[arg(long, env = "TENANTRY_DEFAULT_SERVER", default_value = crate::domain::server::DEFAULT_SERVER, value_parser = parse_server_name)]
    pub default_server: String,

    /// Place tenants only on the PostgresServers whose labels match this selector
    /// (`kubectl get -l` syntax, e.g. `env=prod`); empty: every PostgresServer. For several
    /// operators (or environments) sharing one Kubernetes cluster.
    #[arg(long, env = "TENANTRY_SERVER_SELECTOR", default_value = "")]
    pub server_selector: String,

    /// Host written into credentials Secrets (default: the host of --database-url). Set it to
    /// the address applications use, e.g. a Service name.
    #[arg(long, env = "TENANTRY_TENANT_DB_HOST")]
    pub tenant_db_host: Option<String>,

    /// Port written into credentials Secrets (default: the port of --database-url).
    #[arg(long, env = "TENANTRY_TENANT_DB_PORT")]
    pub tenant_db_port: Option<u16>,

    /// `sslmode` written into the URIs of credentials Secrets and of the gateway Secret
    /// (default: the sslmode of --database-url, if it has one). Wins over an `sslmode` given by
    /// --tenant-db-tls-param.
    #[arg(long, env = "TENANTRY_TENANT_DB_SSLMODE", value_parser = crate::domain::state::SSL_MODES)]
    pub tenant_db_sslmode: Option<String>,

    /// A libpq TLS parameter written into the URIs of credentials Secrets and of the gateway
    /// Secret, as NAME=VALUE (sslmode, sslnegotiation, sslrootcert, sslcert, sslkey, sslcrl,
    /// sslsni); repeatable or comma-separated. Default: those of --database-url. An empty
    /// VALUE removes one inherited from --database-url. File paths are where applications
    /// find the files, not the operator.
    #[arg(long, env = "TENANTRY_TENANT_DB_TLS_PARAMS", value_delimiter = ',', value_parser = parse_tls_param)]
    pub tenant_db_tls_param: Vec<(String, String)>,

    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "TENANTRY_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,

    /// Role the API server logs in as; it becomes a member of every tenant role. Empty to
    /// disable.
    #[arg(
        long,
        env = "TENANTRY_GATEWAY_ROLE",
        default_value = "tenantry_gateway"
    )]
    pub gateway_role: String,

    /// Secret holding the gateway role's credentials (keys username, password, host, port,
    /// dbname, uri). If it exists before the first start, its `password` is used.
    #[arg(
        long,
        env = "TENANTRY_GATEWAY_SECRET",
        default_value = "tenantry-gateway"
    )]
    pub gateway_secret: String,

    /// Namespace of the gateway Secret (default: POD_NAMESPACE, else the kubeconfig namespace).
    #[arg(long, env = "TENANTRY_GATEWAY_SECRET_NAMESPACE")]
    pub gateway_secret_namespace: Option<String>,

    /// Elect a leader through a Lease so that several replicas can run; only the leader
    /// reconciles.
    #[arg(long, env = "TENANTRY_LEADER_ELECTION")]
    pub leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, env = "TENANTRY_LEASE_NAME", default_value = "tenantry-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: POD_NAMESPACE, else the kubeconfig namespace).
    #[arg(long, env = "TENANTRY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Rollout of a new migration set: migrate this many already-provisioned tenants first
    /// and the rest only once they all succeeded (0: no canary).
    #[arg(long, env = "TENANTRY_ROLLOUT_CANARY", default_value_t = 0)]
    pub rollout_canary: usize,

    /// Stop migrating tenants once this many failed the new set (0: never stop).
    #[arg(long, env = "TENANTRY_ROLLOUT_MAX_FAILURES", default_value_t = 0)]
    pub rollout_max_failures: usize,

    /// Milliseconds a migration statement (or the wait for a schema's migration lock) waits for
    /// a lock before the tenant's migration gives up and is retried later
    /// (`MigrationsApplied=False reason=LockTimeout`).
    #[arg(long, env = "TENANTRY_MIGRATION_LOCK_TIMEOUT_MS", default_value_t = crate::postgres::migrations::DEFAULT_LOCK_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub migration_lock_timeout_ms: u64,

    /// Seconds a leader that stops renewing keeps the lease; a standby takes over after it.
    #[arg(long, env = "TENANTRY_LEASE_DURATION_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_secs: u64,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The Tenant (metadata.name).
    pub tenant: String,

    /// Namespace of the Tenant (default: the kubeconfig namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,

    /// Subject (`sub` claim).
    #[arg(long, default_value = "tenantry-cli")]
    pub subject: String,

    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,

    /// Kubeconfig file; without it the usual inference applies.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// Signs a tenant token: HS256 with the tenant's `jwt-key`, claims `tenant`, `sub`, `iat`, `exp`.
pub fn mint_token(
    tenant: &str,
    key: &[u8],
    subject: &str,
    ttl_secs: u64,
) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims =
        serde_json::json!({"tenant": tenant, "sub": subject, "iat": now, "exp": now + ttl_secs});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )?)
}

async fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let client = kube_client(args.kubeconfig.as_ref(), None).await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let tenant = kube::Api::<Tenant>::namespaced(client.clone(), &ns)
        .get(&args.tenant)
        .await
        .with_context(|| format!("reading Tenant {ns}/{}", args.tenant))?;
    let secret_name = credentials::effective_secret_name(&tenant);
    let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client, &ns)
        .get(&secret_name)
        .await
        .with_context(|| format!("reading Secret {ns}/{secret_name}"))?;
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(credentials::JWT_KEY))
        .map(|b| b.0.clone())
        .ok_or_else(|| anyhow::anyhow!("Secret {ns}/{secret_name} has no jwt-key yet"))?;
    println!(
        "{}",
        mint_token(&args.tenant, &key, &args.subject, args.ttl_secs)?
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Connection for the shared pool, as the gateway role (e.g. the `uri` key of the
    /// operator's `tenantry-gateway` Secret).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub signing_key: SigningKeyArgs,

    /// Serve Tenants of this namespace only (default: all namespaces). Repeat the flag, or
    /// separate names with commas, to serve several: one watch per namespace, which namespaced
    /// Roles allow.
    #[arg(long = "namespace", env = "TENANTRY_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Address serving /v1, /healthz, /readyz and /openapi.json: tenant traffic.
    #[arg(long, env = "TENANTRY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address serving /metrics (and /healthz, /readyz), apart from tenant traffic.
    #[arg(long, env = "TENANTRY_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Route `<tenant>.<base domain>` hosts to tenants (in addition to spec.hosts).
    #[arg(long, env = "TENANTRY_BASE_DOMAIN")]
    pub base_domain: Option<String>,

    /// Required `iss` claim, when set.
    #[arg(long, env = "TENANTRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "TENANTRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on exp/nbf, in seconds.
    #[arg(long, env = "TENANTRY_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// Verification key of the platform token issuer: a PEM public key (RS256, ES256) or the
    /// raw secret (HS256), typically mounted from a Secret.
    #[arg(long, env = "TENANTRY_PLATFORM_KEY_FILE")]
    pub platform_key_file: Option<PathBuf>,

    /// Algorithm of the platform key: RS256, ES256 or HS256.
    #[arg(long, env = "TENANTRY_PLATFORM_KEY_ALG", default_value = "RS256")]
    pub platform_key_alg: String,

    /// Connections in the shared pool (the API never opens more, whatever the tenant count).
    #[arg(long, env = "TENANTRY_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pool_size: u32,

    /// How long a request waits for a free connection before 503.
    #[arg(long, env = "TENANTRY_POOL_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub pool_acquire_timeout_ms: u64,

    /// Connections are replaced after this many seconds (bounds per-backend catalog caches).
    #[arg(long, env = "TENANTRY_POOL_MAX_LIFETIME_SECS", default_value_t = 1800)]
    pub pool_max_lifetime_secs: u64,

    /// Prepared statements kept per pool connection (one per tenant table and query shape
    /// it served); the least recently used beyond this are closed on the server.
    #[arg(long, env = "TENANTRY_POOL_STATEMENT_CACHE", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub pool_statement_cache: u64,

    /// How long a request waits for a connection of its tenant's home group (the pool is
    /// split into groups of four connections, a tenant's chosen by its schema) before it
    /// takes any free one. Keeps each backend's share of tenants, and so its memory and
    /// statement cache, to one group's; 0 takes any free connection at once. No effect below
    /// 8 connections (one group); at or above the acquire timeout, nothing is borrowed.
    #[arg(long, env = "TENANTRY_POOL_HOME_WAIT_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub pool_home_wait_ms: u64,

    /// Largest accepted request body.
    #[arg(long, env = "TENANTRY_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Rows returned when no limit is given.
    #[arg(long, env = "TENANTRY_DEFAULT_LIMIT", default_value_t = 100)]
    pub default_limit: i64,

    /// Largest accepted limit.
    #[arg(long, env = "TENANTRY_MAX_LIMIT", default_value_t = 1000)]
    pub max_limit: i64,

    /// Per-statement timeout, in milliseconds.
    #[arg(long, env = "TENANTRY_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub statement_timeout_ms: u64,

    /// How long a statement waits for a lock before 503 `lock-timeout`, in milliseconds
    /// (0: only the statement timeout bounds it). Bounds how long a tenant that locks its own
    /// tables can hold pool connections.
    #[arg(long, env = "TENANTRY_LOCK_TIMEOUT_MS", default_value_t = 1000)]
    pub lock_timeout_ms: u64,

    /// Data requests one tenant may have in flight; beyond, a request waits 100 ms for a slot,
    /// then 429 `too-many-requests`. 0: a quarter of the pool, at least 1.
    #[arg(long, env = "TENANTRY_TENANT_MAX_CONCURRENCY", default_value_t = 0)]
    pub tenant_max_concurrency: u32,

    /// Allow logging in as a superuser or a BYPASSRLS role (isolation then rests on our code).
    #[arg(long)]
    pub allow_privileged_role: bool,

    /// The server --database-url connects to, as Tenants' `status.server` names it (the
    /// operator's --default-server): tenants placed on another server are answered 503
    /// `tenant-on-another-server`.
    #[arg(long, env = "TENANTRY_SERVER", default_value = crate::domain::server::DEFAULT_SERVER, value_parser = parse_server_name)]
    pub server: String,

    /// Servers this API keeps a pool open to, its own included: a tenant on another server is
    /// served over a pool of --pool-size connections to it, opened at its first request, so
    /// the API holds at most --pool-size × --max-servers connections. 1: its own server only
    /// (other servers' tenants are answered 503 `tenant-on-another-server`).
    #[arg(long, env = "TENANTRY_MAX_SERVERS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_servers: u32,
}

/// Builds a kube client from an explicit kubeconfig or by inference.
pub async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    context: Option<&str>,
) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &options).await?
        }
        None if context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// `NAME=VALUE` of `--tenant-db-tls-param`, checked like the credentials check it.
fn parse_tls_param(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    crate::domain::state::check_tls_param(name, value).map_err(|e| e.to_string())?;
    Ok((name.to_string(), value.to_string()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "tenantry".into())
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted (Ctrl-C)"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// `--migrations-configmap NAME` (in `default_namespace`) or `NAMESPACE/NAME`.
/// A server name: an RFC 1123 label.
fn parse_server_name(s: &str) -> Result<String, String> {
    let re = regex::Regex::new(crate::domain::server::SERVER_NAME_PATTERN).expect("a pattern");
    if re.is_match(s) {
        Ok(s.to_string())
    } else {
        Err("a server name is a lowercase RFC 1123 label ([a-z0-9-], at most 63)".into())
    }
}

fn configmap_source(cm: &str, default_namespace: &str) -> anyhow::Result<controller::SourceKind> {
    let (namespace, name) = cm.split_once('/').unwrap_or((default_namespace, cm));
    if name.is_empty() || namespace.is_empty() || name.contains('/') {
        anyhow::bail!("--migrations-configmap {cm:?}: expected NAME or NAMESPACE/NAME");
    }
    Ok(controller::SourceKind::ConfigMap {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Where the controller's migration set comes from, when it has a source to watch.
fn migration_source(
    args: &ControllerArgs,
    own_namespace: &str,
) -> anyhow::Result<Option<controller::MigrationSource>> {
    let poll = std::time::Duration::from_secs(args.migrations_poll_secs);
    let kind = match (&args.migrations_dir, &args.migrations_configmap) {
        (Some(dir), _) => controller::SourceKind::Dir(dir.clone()),
        (None, Some(cm)) => configmap_source(cm, own_namespace)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(controller::MigrationSource {
        kind,
        demo: args.demo_migrations,
        poll,
    }))
}

/// The set `tenantry migrations lint|plan` are given: a directory's or a ConfigMap's (read
/// through the Kubernetes API), after the demo set when asked for. Not linted here.
async fn load_set(args: &SetArgs, kube: Option<&KubeArgs>) -> anyhow::Result<MigrationSet> {
    let Some(cm) = &args.migrations_configmap else {
        return unchecked_migration_set(args.demo_migrations, args.migrations_dir.as_deref());
    };
    let client = match kube {
        Some(k) => k.client().await?,
        None => kube_client(None, None).await?,
    };
    let source = controller::MigrationSource {
        kind: configmap_source(cm, client.default_namespace())?,
        demo: args.demo_migrations,
        poll: std::time::Duration::from_secs(10),
    };
    source
        .load(&client)
        .await
        .with_context(|| source.describe())
}

/// Refuses a set that must not run (the lint's findings).
pub fn check_set(set: &MigrationSet) -> anyhow::Result<()> {
    let findings = crate::postgres::lint::lint(set);
    if !findings.is_empty() {
        anyhow::bail!("{}", lint_refusal(&findings));
    }
    Ok(())
}

/// The tenant migration set the flags ask for: the demo set, a directory's, both (demo first)
/// or none. A set with lint findings is refused, every finding listed.
pub fn migration_set(demo: bool, dir: Option<&std::path::Path>) -> anyhow::Result<MigrationSet> {
    let set = unchecked_migration_set(demo, dir)?;
    check_set(&set)?;
    Ok(set)
}

/// The error text of a set refused by the lint.
pub fn lint_refusal(findings: &[crate::postgres::lint::Finding]) -> String {
    let list: Vec<String> = findings.iter().map(|f| format!("  {f}")).collect();
    format!(
        "the migration set has {} lint finding(s); nothing was run (fix them, or opt a statement \
         out with a `-- {} <rule-id> <reason>` comment; see README, Migration lint):\n{}",
        findings.len(),
        crate::postgres::lint::ALLOW_MARKER,
        list.join("\n")
    )
}

/// The set the flags ask for, not linted.
fn unchecked_migration_set(
    demo: bool,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<MigrationSet> {
    let base = if demo {
        MigrationSet::embedded()
    } else {
        MigrationSet::default()
    };
    let set = match dir {
        Some(dir) => base
            .then(MigrationSet::from_dir(dir)?)
            .context("--demo-migrations with --migrations-dir")?,
        None => base,
    };
    if set.latest().is_none() {
        tracing::info!(
            "no tenant migrations (neither --migrations-dir nor --demo-migrations): tenants get an empty schema"
        );
    }
    Ok(set)
}

/// The TenantRollout CRD as committed in `crds/tenantrollout.yaml`.
pub fn rollout_crd_yaml() -> String {
    let body = serde_yaml::to_string(&crate::domain::rollout::TenantRollout::crd())
        .expect("the CRD serializes");
    format!("# Generated by `tenantry crd tenantrollout`; do not edit by hand.\n{body}")
}

/// The CRD as committed in `crds/postgresserver.yaml`.
pub fn server_crd_yaml() -> String {
    let body = serde_yaml::to_string(&crate::domain::server::PostgresServer::crd())
        .expect("the CRD serializes");
    format!("# Generated by `tenantry crd postgresserver`; do not edit by hand.\n{body}")
}

/// The CRD as committed in `crds/tenant.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&Tenant::crd()).expect("the CRD serializes");
    format!("# Generated by `tenantry crd`; do not edit by hand.\n{body}")
}

async fn run_api(args: ApiArgs) -> anyhow::Result<()> {
    use crate::api;
    let platform = match &args.platform_key_file {
        Some(path) => Some(api::auth::PlatformKey::from_file(
            path,
            &args.platform_key_alg,
        )?),
        None => None,
    };
    let settings = api::Settings {
        auth: api::auth::AuthConfig {
            issuer: args.jwt_issuer,
            audience: args.jwt_audience,
            leeway_secs: args.jwt_leeway_secs,
            platform,
        },
        limits: api::Limits {
            default_limit: args.default_limit,
            max_limit: args.max_limit,
            max_offset: 100_000,
            max_body_bytes: args.max_body_bytes,
            statement_timeout_ms: args.statement_timeout_ms,
            lock_timeout_ms: args.lock_timeout_ms,
            tenant_max_concurrency: args.tenant_max_concurrency,
        },
        server: args.server.clone(),
    };
    let pool_config = api::PoolConfig {
        size: args.pool_size,
        acquire_timeout: std::time::Duration::from_millis(args.pool_acquire_timeout_ms),
        max_lifetime: std::time::Duration::from_secs(args.pool_max_lifetime_secs),
        statement_cache: args.pool_statement_cache as usize,
        home_wait: std::time::Duration::from_millis(args.pool_home_wait_ms),
    };
    let pool = api::connect(&args.database_url, pool_config, args.allow_privileged_role)
        .await
        .context("--database-url")?;
    let client = args.kube.client().await?;
    let servers = (args.max_servers > 1).then(|| {
        api::ServerPools::new(
            client.clone(),
            args.database_url.clone(),
            pool_config,
            args.allow_privileged_role,
            args.max_servers as usize,
        )
    });
    let config = crate::registry::Config {
        namespaces: args.namespaces.clone(),
        base_domain: args.base_domain.clone(),
        signing_key: args.signing_key.locate(&client),
    };
    let (registry, _watch) = crate::registry::watch(client, &config);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let ops_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("--metrics-listen {}", args.metrics_listen))?;
    let state = api::AppState::with_servers(registry, pool, servers, settings);
    let (stop_ops, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    let ops = tokio::spawn(api::serve_ops(ops_listener, state.clone(), async {
        let _ = ops_stopped.await;
    }));
    api::serve(listener, state, shutdown_signal()).await?;
    let _ = stop_ops.send(());
    ops.await??;
    Ok(())
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Crd { kind } => {
                match kind {
                    CrdKind::Tenant => print!("{}", crd_yaml()),
                    CrdKind::Tenantrollout => print!("{}", rollout_crd_yaml()),
                    CrdKind::Postgresserver => print!("{}", server_crd_yaml()),
                }
                Ok(())
            }
            Command::Token(args) => run_token(args).await,
            Command::Migrations(MigrationsCommand::Lint(args)) => {
                let set = load_set(&args, None).await?;
                let findings = crate::postgres::lint::lint(&set);
                for f in &findings {
                    println!("{f}");
                }
                if findings.is_empty() {
                    println!("{} migration(s), no lint findings", set.migrations().len());
                    Ok(())
                } else {
                    anyhow::bail!("{} lint finding(s)", findings.len())
                }
            }
            Command::Migrations(MigrationsCommand::Plan(args)) => {
                let set = load_set(&args.set, Some(&args.kube)).await?;
                let known = if args.kubernetes {
                    let client = args.kube.client().await?;
                    let tenants = kube::Api::<Tenant>::all(client)
                        .list(&Default::default())
                        .await
                        .context("listing Tenants")?;
                    Some(crate::postgres::plan::known_tenants(&tenants.items))
                } else {
                    None
                };
                let plan =
                    crate::postgres::plan::plan(&args.database_url, &set, known.as_deref()).await?;
                print!("{}", plan.render(args.output));
                Ok(())
            }
            Command::Api(args) => {
                telemetry::init_logging(&self.log_level, self.log_format)?;
                run_api(*args).await
            }
            Command::Controller(args) => {
                telemetry::init_logging(&self.log_level, self.log_format)?;
                let gateway = match args.gateway_role.as_str() {
                    "" => None,
                    name => Some(Ident::parse_role(name).context("--gateway-role")?),
                };
                let admin = Admin::new(
                    &args.database_url,
                    args.db_max_connections,
                    args.tenant_db_host.clone(),
                    args.tenant_db_port,
                )
                .context("--database-url")?
                .with_gateway(gateway.clone())
                .with_tenant_tls(
                    args.tenant_db_tls_param
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .chain(args.tenant_db_sslmode.as_deref().map(|m| ("sslmode", m))),
                )
                .context("--tenant-db-tls-param")?
                .with_tenant_connection_limit(args.tenant_connection_limit)
                .with_migration_lock_timeout(args.migration_lock_timeout_ms);
                let client = args.kube.client().await?;
                let own_namespace = std::env::var("POD_NAMESPACE")
                    .unwrap_or_else(|_| client.default_namespace().to_string());
                let gateway_namespace = args
                    .gateway_secret_namespace
                    .clone()
                    .unwrap_or_else(|| own_namespace.clone());
                let leader = args.leader_election.then(|| crate::leader::LeaseConfig {
                    namespace: args
                        .lease_namespace
                        .clone()
                        .unwrap_or_else(|| own_namespace.clone()),
                    name: args.lease_name.clone(),
                    identity: std::env::var("POD_NAME")
                        .unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id())),
                    lease_duration: std::time::Duration::from_secs(args.lease_duration_secs),
                    renew_every: std::time::Duration::from_secs(
                        (args.lease_duration_secs / 3).max(1),
                    ),
                });
                let signing_key = args.signing_key.locate(&client);
                let source = migration_source(&args, &own_namespace)?;
                let migrations = match &source {
                    Some(source) => {
                        let set = source
                            .load(&client)
                            .await
                            .with_context(|| source.describe())?;
                        check_set(&set)?;
                        set
                    }
                    None => migration_set(args.demo_migrations, None)?,
                };
                let rollout_object = (!args.rollout_name.is_empty())
                    .then(|| (own_namespace.clone(), args.rollout_name.clone()));
                let args = *args;
                let run = controller::run(
                    client,
                    admin,
                    migrations,
                    controller::Settings {
                        namespaces: args.namespaces,
                        concurrency: args.concurrency,
                        health_addr: args.health_addr,
                        gateway_secret: gateway.map(|_| (gateway_namespace, args.gateway_secret)),
                        signing_key,
                        base_domain: args.base_domain,
                        leader,
                        rollout: controller::RolloutPolicy {
                            canary: args.rollout_canary,
                            max_failures: args.rollout_max_failures,
                        },
                        usage_interval: std::time::Duration::from_secs(args.usage_interval_secs),
                        drift_interval: std::time::Duration::from_secs(args.drift_interval_secs),
                        resync: std::time::Duration::from_secs(args.resync_secs),
                        migration_source: source,
                        rollout_object,
                        default_server: args.default_server,
                        server_selector: args.server_selector,
                    },
                    telemetry::Metrics::default(),
                    shutdown_signal(),
                )
                .await;
                match run {
                    Err(e @ controller::RunError::LeaseLost) => {
                        // At once, without unwinding or formatting a backtrace: a standby may
                        // acquire one renew interval after this replica stepped down, and
                        // exiting closes every database session (open transactions roll back).
                        tracing::error!("{e}");
                        std::process::exit(1)
                    }
                    run => Ok(run?),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_repeat_or_take_a_comma_list() {
        let cli = Cli::try_parse_from([
            "tenantry",
            "api",
            "--database-url=postgres://x",
            "--namespace=a",
            "--namespace",
            "b,c",
        ])
        .unwrap();
        let Command::Api(args) = cli.command else {
            panic!("api")
        };
        assert_eq!(args.namespaces, ["a", "b", "c"]);
        let cli =
            Cli::try_parse_from(["tenantry", "controller", "--database-url=postgres://x"]).unwrap();
        let Command::Controller(args) = cli.command else {
            panic!("controller")
        };
        assert!(args.namespaces.is_empty(), "default: all namespaces");
        assert!(!args.demo_migrations && args.migrations_dir.is_none());
    }

    /// The `--flags` of the README table in the section whose heading starts with `heading`.
    fn readme_flags(heading: &str) -> std::collections::BTreeSet<String> {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## ")
            .find(|s| s.starts_with(heading))
            .unwrap_or_else(|| panic!("README has a section {heading:?}"));
        section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .flat_map(|l| {
                let first_cell = l.split('|').nth(1).unwrap_or_default();
                first_cell
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|f| f.trim_start_matches("--").to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The long flags of a subcommand, without help and version.
    fn code_flags(sub: &str) -> std::collections::BTreeSet<String> {
        use clap::CommandFactory;
        let cli = Cli::command();
        let cmd = cli.find_subcommand(sub).expect("subcommand");
        cmd.get_arguments()
            .filter_map(|a| a.get_long())
            .chain(cli.get_arguments().filter_map(|a| a.get_long()))
            .filter(|f| !matches!(*f, "help" | "version"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_readme_flag_tables_are_the_flags() {
        for (sub, heading) in [
            ("controller", "Configuration (`tenantry controller`)"),
            ("api", "The API (`tenantry api`)"),
        ] {
            let documented = readme_flags(heading);
            let code = code_flags(sub);
            let undocumented: Vec<_> = code
                .iter()
                .filter(|f| !documented.contains(*f))
                .filter(|f| sub == "controller" || !f.starts_with("log-"))
                .collect();
            assert!(
                undocumented.is_empty(),
                "{sub}: README lacks {undocumented:?}"
            );
            let unknown: Vec<_> = documented.difference(&code).collect();
            assert!(
                unknown.is_empty(),
                "{sub}: README documents {unknown:?}, which do not exist"
            );
        }
    }

    #[test]
    fn the_migration_set_is_an_explicit_choice() {
        assert_eq!(migration_set(false, None).unwrap().latest(), None);
        let demo = migration_set(true, None).unwrap();
        assert_eq!(demo, MigrationSet::embedded());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("3_mine.sql"), "CREATE TABLE mine (id int)").unwrap();
        let adopted = migration_set(true, Some(dir.path())).unwrap();
        assert_eq!(adopted.latest(), Some(3));
        assert_eq!(adopted.migrations()[..2], demo.migrations()[..]);
        std::fs::write(dir.path().join("2_clash.sql"), "SELECT 1").unwrap();
        let err = migration_set(true, Some(dir.path())).unwrap_err();
        assert!(format!("{err:#}").contains("version 2"), "{err:#}");
    }

    #[test]
    fn a_set_with_lint_findings_is_refused_listing_every_finding() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("3_lookup.sql"),
            "CREATE INDEX tasks_title_idx ON tasks (title);\n\
             ALTER TABLE tasks ALTER COLUMN title TYPE varchar(500);",
        )
        .unwrap();
        let err = migration_set(true, Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 lint finding(s)"), "{err}");
        assert!(
            err.contains("3_lookup.sql:1: [create-index-non-concurrent]")
                && err.contains("3_lookup.sql:2: [alter-column-type]"),
            "{err}"
        );
        // The same statement with a marked opt-out passes.
        std::fs::write(
            dir.path().join("3_lookup.sql"),
            "-- tenantry:lint-allow create-index-non-concurrent tasks stay small\n\
             CREATE INDEX tasks_title_idx ON tasks (title);",
        )
        .unwrap();
        assert_eq!(
            migration_set(true, Some(dir.path())).unwrap().latest(),
            Some(3)
        );
    }

    #[test]
    fn migrations_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "tenantry",
            "migrations",
            "plan",
            "--demo-migrations",
            "--database-url=postgres://x",
            "-o",
            "json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Migrations(MigrationsCommand::Plan(PlanArgs {
                output: crate::postgres::plan::Output::Json,
                ..
            }))
        ));
        let cli =
            Cli::try_parse_from(["tenantry", "controller", "--database-url=postgres://x"]).unwrap();
        let Command::Controller(args) = cli.command else {
            panic!("controller")
        };
        assert_eq!(args.migration_lock_timeout_ms, 5_000);
    }
}
