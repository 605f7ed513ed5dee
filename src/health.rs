//! The operator's small HTTP server: `/healthz` (the process is alive), `/readyz` (watches
//! have synced and the database answers) and `/metrics` (Prometheus text format).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{postgres::Admin, telemetry::Metrics};

/// What `/readyz` reports on.
#[derive(Clone, Default)]
pub struct Readiness {
    /// The first full list of Tenants has arrived.
    pub synced: Arc<AtomicBool>,
    /// A replica waiting for the leader lease: ready (so rollouts proceed), but idle.
    pub standby: Arc<AtomicBool>,
}

#[derive(Clone)]
struct HealthState {
    metrics: Metrics,
    readiness: Readiness,
    admin: Admin,
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    admin: Admin,
) -> anyhow::Result<SocketAddr> {
    let state = HealthState {
        metrics,
        readiness,
        admin,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(bound)
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    if s.readiness.standby.load(Ordering::SeqCst) {
        return (StatusCode::OK, "standby\n");
    }
    if !s.readiness.synced.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "tenant watch not synced yet\n",
        );
    }
    if !s.admin.ping().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "database does not answer\n",
        );
    }
    (StatusCode::OK, "ok\n")
}

async fn metrics_handler(State(s): State<HealthState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
