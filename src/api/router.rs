//! The routes, and [`serve`], which runs them on a listener until shutdown; the operations
//! routes (`/metrics`) on a listener of their own ([`serve_ops`]).

use std::net::SocketAddr;

use axum::{
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tracing::info;

use super::{error::ApiError, handlers, observe, openapi, state::AppState};

/// The router with every route; `state` carries the registry and the pool.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.limits.max_body_bytes;
    Router::new()
        .route("/v1/tenant", get(handlers::get_tenant))
        .route("/v1/tables", get(handlers::list_tables))
        .route("/v1/openapi.json", get(handlers::openapi))
        .route(
            "/v1/tables/{table}",
            get(handlers::list_rows)
                .post(handlers::insert_rows)
                .patch(handlers::update_rows)
                .delete(handlers::delete_rows),
        )
        .route("/v1/tables/{table}/{id}", get(handlers::get_row))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .fallback(|| async { ApiError::not_found("not-found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// The operations routes, served on a port of their own ([`serve_ops`]) so that tenant
/// traffic never reaches them: `/metrics`, and the probes.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(observe::metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Runs [`ops_router`] on `listener` until `shutdown` resolves.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "tenantry API metrics listening");
    axum::serve(listener, ops_router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Ready once the registry has synced: before that, every tenant would look unknown.
async fn readyz(State(state): State<AppState>) -> Response {
    if !state.registry.is_synced() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "tenant registry not synced yet\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

/// Runs the API on `listener` until `shutdown` resolves. The registry is fed elsewhere (see
/// [`crate::registry::watch`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "tenantry API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
