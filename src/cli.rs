//! The `tenantry` command line: flags with environment fallbacks, and the wiring of each
//! subcommand to the library.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::{config::KubeConfigOptions, Client, Config, CustomResourceExt};

use crate::{
    controller,
    crd::Tenant,
    naming::Ident,
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
    Controller(ControllerArgs),
    /// Print the Tenant CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Admin connection to the tenants' database (a role with CREATEROLE, or a superuser).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Kubeconfig file; without it the usual inference applies (KUBECONFIG, ~/.kube/config,
    /// in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,

    /// Watch Tenants in this namespace only (default: all namespaces).
    #[arg(long, env = "TENANTRY_NAMESPACE")]
    pub namespace: Option<String>,

    /// Directory of tenant migrations (`<version>_<name>.sql`); default: the embedded set.
    #[arg(long, env = "TENANTRY_MIGRATIONS_DIR")]
    pub migrations_dir: Option<PathBuf>,

    /// Tenants reconciled in parallel.
    #[arg(long, env = "TENANTRY_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Size of the admin connection pool.
    #[arg(long, env = "TENANTRY_DB_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// Host written into credentials Secrets (default: the host of --database-url). Set it to
    /// the address applications use, e.g. a Service name.
    #[arg(long, env = "TENANTRY_TENANT_DB_HOST")]
    pub tenant_db_host: Option<String>,

    /// Port written into credentials Secrets (default: the port of --database-url).
    #[arg(long, env = "TENANTRY_TENANT_DB_PORT")]
    pub tenant_db_port: Option<u16>,

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
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The CRD as committed in `crds/tenant.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&Tenant::crd()).expect("the CRD serializes");
    format!("# Generated by `tenantry crd`; do not edit by hand.\n{body}")
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Crd => {
                print!("{}", crd_yaml());
                Ok(())
            }
            Command::Controller(args) => {
                telemetry::init_logging(&self.log_level, self.log_format)?;
                let migrations = match &args.migrations_dir {
                    Some(dir) => MigrationSet::from_dir(dir)?,
                    None => MigrationSet::embedded(),
                };
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
                .with_gateway(gateway.clone());
                let client = kube_client(args.kubeconfig.as_ref(), args.context.as_deref()).await?;
                let gateway_namespace = args
                    .gateway_secret_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| client.default_namespace().to_string());
                controller::run(
                    client,
                    admin,
                    migrations,
                    controller::Settings {
                        namespace: args.namespace,
                        concurrency: args.concurrency,
                        health_addr: args.health_addr,
                        gateway_secret: gateway.map(|_| (gateway_namespace, args.gateway_secret)),
                    },
                    telemetry::Metrics::default(),
                    shutdown_signal(),
                )
                .await
            }
        }
    }
}
