//! What the API tells about itself: a span and metrics per request (bounded labels: route
//! templates, methods, status codes), `/metrics`, and the rewriting of axum's own rejections
//! into problem+json so that every error a client sees has the same shape.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{header, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry as PromRegistry,
};
use tracing::Instrument;

use super::{error::ApiError, state::AppState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    state: &'static str,
    /// The PostgreSQL server of the pool (`--server` for the API's own).
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

/// The API's metrics: bounded label sets (route templates, methods, status codes).
#[derive(Clone)]
pub struct ApiMetrics {
    registry: Arc<PromRegistry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram>,
    tenants: Gauge,
    pool: Family<PoolLabel, Gauge>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let mut registry = PromRegistry::with_prefix("tenantry_api");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        let tenants = Gauge::default();
        let pool = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "registry_tenants",
            "Tenants in the registry",
            tenants.clone(),
        );
        registry.register(
            "pool_connections",
            "Database pool connections by state",
            pool.clone(),
        );
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the label carries the API's version",
            build,
        );
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            tenants,
            pool,
        }
    }
}

impl ApiMetrics {
    /// The OpenMetrics text exposition as it stands (`/metrics` samples the gauges first).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Request span (route, method, tenant) and metrics.
pub(super) async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // The span (a log line, not a time series) keeps the method as sent.
    let span = tracing::info_span!("request", method = %req.method(), %route, tenant = tracing::field::Empty, status = tracing::field::Empty);
    let method = method_label(req.method());
    let started = Instant::now();
    let res = as_problem(next.run(req).instrument(span.clone()).await);
    let status = res.status().as_u16();
    span.record("status", status);
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    state
        .metrics
        .latency
        .get_or_create(&RouteLabel { route })
        .observe(started.elapsed().as_secs_f64());
    res
}

/// The `method` label: the methods HTTP defines for this API, and `other` for anything a
/// client invents (`FOOBAR` is a valid method token), which would otherwise add a label value,
/// and a time series, per name.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Rejections produced by axum itself (body too large, wrong method, bad path) become
/// problem+json like every other error.
fn as_problem(res: Response) -> Response {
    let status = res.status();
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return res;
    }
    let kind = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::NOT_FOUND => "not-found",
        s if s.is_client_error() => "bad-request",
        _ => "internal",
    };
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than the server accepts".to_string()
        }
        StatusCode::METHOD_NOT_ALLOWED => "this route does not support that method".to_string(),
        s => s.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut problem = ApiError::new(status, kind, detail).into_response();
    if let Some(allow) = res.headers().get(header::ALLOW) {
        problem.headers_mut().insert(header::ALLOW, allow.clone());
    }
    problem
}

/// `/metrics`: the gauges are sampled when scraped.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    m.tenants.set(state.registry.len() as i64);
    let mut pools = vec![(state.settings.server.clone(), state.pool.clone())];
    if let Some(servers) = &state.servers {
        pools.extend(servers.opened());
    }
    for (server, pool) in pools {
        let idle = pool.num_idle() as i64;
        let size = pool.size() as i64;
        let label = |state| PoolLabel {
            state,
            server: server.clone(),
        };
        m.pool.get_or_create(&label("idle")).set(idle);
        m.pool.get_or_create(&label("in_use")).set(size - idle);
    }
    let mut out = String::new();
    encode(&mut out, &m.registry).expect("writing to a String cannot fail");
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        for (m, label) in [
            ("GET", "GET"),
            ("DELETE", "DELETE"),
            ("OPTIONS", "OPTIONS"),
            ("CONNECT", "other"),
            ("TRACE", "other"),
            ("FOOBAR", "other"),
            ("get", "other"),
            ("PROPFIND", "other"),
        ] {
            assert_eq!(
                method_label(&Method::from_bytes(m.as_bytes()).unwrap()),
                label,
                "{m}"
            );
        }
    }
}
