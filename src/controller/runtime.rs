//! Runtime wiring: watches, the kube-runtime `Controller`, leader election, the health server
//! and the database bootstrap.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    runtime::{
        controller::{Config as ControllerConfig, Controller},
        reflector::{self, reflector},
        watcher, WatchStreamExt,
    },
    Api, Client,
};
use tracing::{info, warn};

use super::{
    context::Context,
    gateway::{ensure_gateway, ensure_signing_key, GatewayError},
    reconcile::{error_policy, reconcile},
    rollout::RolloutPolicy,
};
use crate::{
    domain::{crd::Tenant, credentials as secret},
    postgres::{migrations::MigrationSet, Admin},
    telemetry::Metrics,
    watch,
};

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Our own Secret and status writes arrive as watch events milliseconds apart: one follow-up
/// reconcile instead of one each.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Waiting for the database at start-up: this long, doubling, at most [`BOOTSTRAP_RETRY_MAX`].
const BOOTSTRAP_RETRY_FIRST: Duration = Duration::from_millis(500);
const BOOTSTRAP_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the controller could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot list Tenants ({0}); is the CRD installed? kubectl apply -f crds/")]
    NoTenants(kube::Error),
    #[error(transparent)]
    Health(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("lost the leader lease; exiting so that this replica restarts as a standby")]
    LeaseLost,
}

/// Settings of `tenantry controller`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch Tenants in these namespaces only (all namespaces when empty).
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub health_addr: SocketAddr,
    /// Where the gateway role's credentials are kept (namespace, name), when the admin has a
    /// gateway role.
    pub gateway_secret: Option<(String, String)>,
    /// The Secret (namespace, name) holding the platform key every tenant's token signing key
    /// is derived from; created with a random key when missing, never overwritten.
    pub signing_key: (String, String),
    /// With an API base domain, `<name>.<base domain>` belongs to the Tenant called `<name>`
    /// (the Routable condition follows the API's rule).
    pub base_domain: Option<String>,
    /// Leader election; `None` runs as the only replica.
    pub leader: Option<crate::leader::LeaseConfig>,
    /// How a new migration set rolls out over tenants that are already provisioned.
    pub rollout: RolloutPolicy,
    /// How often the fleet's storage usage is measured (`status.usage`, storage quotas).
    pub usage_interval: Duration,
    /// How often the fleet is scanned for schema drift (`SchemaDrift`); zero: never.
    pub drift_interval: Duration,
    /// How long a tenant waits at most for its next full verification against PostgreSQL and
    /// its Secret (a Ready one, and one waiting for a conflict or a failure to be resolved):
    /// damage done out of band (a role, the schema or the history table dropped, a mark
    /// edited) is found then at the latest. Default [`super::reconcile::RESYNC`].
    pub resync: Duration,
    /// Where the migration set comes from, watched for changes (`None`: the set given at
    /// start is the only one).
    pub migration_source: Option<super::live::MigrationSource>,
    /// The TenantRollout (namespace, name) the rollout is reported on (`None`: logs and
    /// metrics only).
    pub rollout_object: Option<(String, String)>,
    /// The name the server behind the admin URL goes by (`status.server`, placements).
    pub default_server: String,
    /// The PostgresServers this operator places tenants on: those whose labels match this
    /// selector (empty: all).
    pub server_selector: String,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    mut admin: Admin,
    migrations: MigrationSet,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let listable: Vec<Api<Tenant>> = match settings.namespaces.as_slice() {
        [] => vec![Api::all(client.clone())],
        many => many
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect(),
    };
    for tenants in listable {
        if let Err(e) = tenants
            .list(&kube::api::ListParams::default().limit(1))
            .await
        {
            return Err(RunError::NoTenants(e));
        }
    }

    metrics.set_migration_target(migrations.latest());
    let synced = Arc::new(AtomicBool::new(false));
    let standby = Arc::new(AtomicBool::new(settings.leader.is_some()));
    let health = crate::health::serve(
        settings.health_addr,
        metrics.clone(),
        crate::health::Readiness {
            synced: synced.clone(),
            standby: standby.clone(),
        },
        admin.clone(),
    )
    .await
    .map_err(|e| RunError::Health(e.into()))?;
    info!(addr = %health, "health and metrics listening");

    // With leader election, wait for the lease (or for shutdown: a standby stops at once);
    // keep renewing it in the background, and stop writing the moment it is lost.
    // Shutdown is watched by its own task (standing by and leading both end on it).
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let (drain_tx, drain) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        let _ = drain_tx.send(());
    });
    let leading = match settings.leader.clone() {
        Some(cfg) => {
            let elector = Arc::new(crate::leader::LeaderElector::new(client.clone(), cfg));
            let renewed = tokio::select! {
                at = elector.acquire() => at,
                _ = stopping.wait_for(|s| *s) => {
                    info!("stopped while standing by");
                    return Ok(());
                }
            };
            standby.store(false, Ordering::SeqCst);
            metrics.set_leader(true);
            let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
            let keeper = tokio::spawn({
                let elector = elector.clone();
                async move {
                    elector.keep(renewed).await;
                    let _ = lost_tx.send(());
                }
            });
            Some(Leading {
                elector,
                keeper,
                lost: lost_rx,
            })
        }
        None => {
            metrics.set_leader(true);
            None
        }
    };
    let (lease_lost, leading) = match leading {
        Some(Leading {
            elector,
            keeper,
            lost,
        }) => (Some(lost), Some((elector, keeper))),
        None => (None, None),
    };
    let lease_lost = async move {
        match lease_lost {
            // Sent, or the keeper ended without sending: either way the lease is not ours.
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lease_lost);
    // The rollout stops starting tenants the moment shutdown begins, not once the controller
    // has drained.
    let (stop_rollout, rollout_stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let _ = drain.await;
        info!("shutting down: reconciles in flight finish first");
        let _ = stop_rollout.send(true);
    };

    // The database may still be starting: keep trying, reporting not-ready meanwhile. A
    // lease lost meanwhile ends this too.
    let prepare = async {
        let mut delay = BOOTSTRAP_RETRY_FIRST;
        loop {
            match admin.bootstrap().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "database not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BOOTSTRAP_RETRY_MAX);
                }
            }
        }
        let gateway_password = match &settings.gateway_secret {
            Some((ns, name)) => ensure_gateway(&client, &admin, ns, name).await?,
            None => None,
        };
        let (ns, name) = &settings.signing_key;
        let key = ensure_signing_key(&client, ns, name).await?;
        Ok::<_, RunError>((key, gateway_password))
    };
    let prepared = tokio::select! {
        key = prepare => Some(key?),
        _ = &mut lease_lost => return Err(RunError::LeaseLost),
        _ = stopping.wait_for(|s| *s) => None,
    };
    let Some((platform_key, gateway_password)) = prepared else {
        step_down(leading).await;
        info!("controller stopped before it started");
        return Ok(());
    };
    let synced_at_stop = synced.clone();
    // Our own reflector (rather than Controller::new) so readiness can follow the watch:
    // ready once the first full list has landed in the store.
    let (reader, writer) = reflector::store();
    let (retrigger, retriggered) = tokio::sync::mpsc::unbounded_channel();
    let (secret_reader, secret_writer) = reflector::store::<Secret>();
    let secret_stream = reflector(
        secret_writer,
        watch::namespaces::<Secret>(
            client.clone(),
            &settings.namespaces,
            watcher::Config::default().labels(&secret::managed_selector()),
        ),
    )
    .touched_objects();
    let ctx = Arc::new(Context::new(
        client,
        migrations,
        metrics,
        reader.clone(),
        secret_reader,
        retrigger,
        settings.rollout,
        settings.base_domain.as_deref(),
        platform_key,
        settings.resync,
        super::servers::Servers::new(
            admin,
            settings.default_server.clone(),
            settings.signing_key.0.clone(),
            settings.server_selector.clone(),
        ),
    ));
    // Placement needs the servers before the first reconcile.
    ctx.servers.set_gateway_password(gateway_password);
    ctx.servers
        .refresh(&ctx.client, &std::collections::HashMap::new())
        .await;
    let tenant_stream = reflector(
        writer,
        watch::namespaces::<Tenant>(
            ctx.client.clone(),
            &settings.namespaces,
            watcher::Config::default(),
        ),
    )
    .inspect_ok({
        let ctx = ctx.clone();
        move |ev| {
            ctx.apply_watch_event(ev);
            if matches!(ev, watcher::Event::InitDone) && !synced.swap(true, Ordering::SeqCst) {
                info!("initial Tenant sync complete");
            }
        }
    })
    .applied_objects();
    let controller = Controller::for_stream(tenant_stream, reader)
        // The watches retry on their own (`watch::WatchBackoff`, at most 5 s); the controller
        // backs off again on every error they pass on, by default growing to 30 s and pausing
        // every trigger meanwhile. After an apiserver restart, whose watches fail for as long
        // as it is down and then end with `410 Expired`, that kept new Tenants unseen for half
        // a minute and more after its return.
        .trigger_backoff(watch::WatchBackoff::new())
        .reconcile_on(tokio_stream_from(retriggered))
        .owns_stream(secret_stream)
        .with_config(
            ControllerConfig::default()
                .concurrency(settings.concurrency)
                .debounce(DEBOUNCE),
        )
        .graceful_shutdown_on(shutdown);
    info!(
        namespaces = %match settings.namespaces.as_slice() {
            [] => "<all>".to_string(),
            many => many.join(","),
        },
        migrations = ctx.migrations().latest(),
        "controller started"
    );
    // The leader measures the fleet's storage usage; reconciles read it.
    let usage = tokio::spawn(super::usage::run(ctx.clone(), settings.usage_interval));
    // And looks at the servers tenants are placed on.
    let servers = tokio::spawn(super::servers::run(ctx.clone()));
    // And scans it for schema drift.
    let drift = (!settings.drift_interval.is_zero())
        .then(|| tokio::spawn(super::drift::run(ctx.clone(), settings.drift_interval)));
    // The leader watches the migration source and rolls every accepted set out.
    let live = tokio::spawn(super::live::run(
        ctx.clone(),
        settings.migration_source.clone(),
        settings.rollout_object.clone(),
        rollout_stopped,
    ));
    let run = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        });
    // A lost lease does not drain: dropping the controller cancels every reconcile in flight
    // (their open transactions roll back when the process exits), because a standby may
    // acquire one renew interval after the renew deadline and two leaders must never write.
    // kube-runtime holds reconciles until the first full sync, and a graceful shutdown cuts
    // the watch that would bring it: shut down before that, it would wait forever. Nothing
    // was reconciled then, so there is nothing to drain.
    let stopped_unsynced = {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
            if synced_at_stop.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    };
    let lost = tokio::select! {
        _ = run => false,
        _ = &mut lease_lost => true,
        _ = stopped_unsynced => false,
    };
    usage.abort();
    servers.abort();
    if let Some(drift) = drift {
        drift.abort();
    }
    live.abort();
    if lost {
        return Err(RunError::LeaseLost);
    }
    step_down(leading).await;
    info!("controller stopped");
    Ok(())
}

/// Hands the lease over, if this replica leads, once nothing more will be written (rather
/// than let the standby wait for it to expire).
async fn step_down(
    leading: Option<(
        Arc<crate::leader::LeaderElector>,
        tokio::task::JoinHandle<()>,
    )>,
) {
    if let Some((elector, keeper)) = leading {
        keeper.abort();
        elector.release().await;
    }
}

/// What the leader holds while it leads.
struct Leading {
    elector: Arc<crate::leader::LeaderElector>,
    keeper: tokio::task::JoinHandle<()>,
    lost: tokio::sync::oneshot::Receiver<()>,
}
