//! `tenantry api`: the tenant-aware data API. Each request is resolved to a tenant from the
//! watch-fed [`Registry`], authenticated with a JWT, and served in one transaction on one
//! shared pool that first switches to the tenant's role and schema (`SET LOCAL`), so
//! PostgreSQL itself refuses anything outside the tenant's schema.

pub mod auth;
pub mod error;
pub mod openapi;
pub mod query;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{FromRequestParts, MatchedPath, Path, RawQuery, Request, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use futures::{future::BoxFuture, FutureExt};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry as PromRegistry,
};
use serde_json::{json, Value};
use sqlx::{postgres::PgPoolOptions, Connection, PgConnection, PgPool};
use tracing::{info, Instrument};

use crate::{
    domain::naming::Ident,
    registry::{Entry, Lookup, Registry},
};
use auth::AuthConfig;
use error::ApiError;
use query::{Catalog, Limits};

/// Settings of `tenantry api`.
#[derive(Clone)]
pub struct Settings {
    /// `<tenant>.<base domain>` routes to a tenant when set.
    pub base_domain: Option<String>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
}

#[derive(Clone, Copy)]
pub struct LimitsConfig {
    pub default_limit: i64,
    pub max_limit: i64,
    pub max_offset: i64,
    pub max_body_bytes: usize,
    pub statement_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_limit: 100,
            max_limit: 1000,
            max_offset: 100_000,
            max_body_bytes: 1 << 20,
            statement_timeout_ms: 5000,
        }
    }
}

/// Pool settings: one pool for all tenants.
#[derive(Clone, Copy)]
pub struct PoolConfig {
    pub size: u32,
    pub acquire_timeout: Duration,
    /// Connections are recycled after this long, bounding each backend's catalog cache as it
    /// visits many tenant schemas.
    pub max_lifetime: Duration,
}

/// Opens the shared pool and refuses roles that would make isolation depend on our code
/// alone (superusers, BYPASSRLS), unless `allow_privileged`.
pub async fn connect(url: &str, cfg: PoolConfig, allow_privileged: bool) -> anyhow::Result<PgPool> {
    let opts = crate::postgres::connect_options(url)?
        .application_name("tenantry-api")
        // One prepared statement per (tenant table, query shape) per connection: tenants
        // times shapes, not the default 100, or every request would re-prepare.
        .statement_cache_capacity(4096);
    let pool = PgPoolOptions::new()
        .max_connections(cfg.size)
        .min_connections(0)
        .acquire_timeout(cfg.acquire_timeout)
        .max_lifetime(cfg.max_lifetime)
        .connect_with(opts)
        .await?;
    let (user, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&pool)
    .await?;
    if (superuser || bypass) && !allow_privileged {
        anyhow::bail!(
            "refusing to serve as {user:?}: it is a superuser or bypasses row-level security, so PostgreSQL would not enforce tenant isolation; log in as the gateway role (default tenantry_gateway) or pass --allow-privileged-role"
        );
    }
    Ok(pool)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
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
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            tenants,
            pool,
        }
    }
}

/// A schema's catalog and the migration version it was read at.
type VersionedCatalog = (Option<i64>, Arc<Catalog>);

/// Catalog of each tenant schema, keyed by schema, valid for one migration version.
#[derive(Default)]
struct CatalogCache {
    entries: Mutex<HashMap<String, VersionedCatalog>>,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub metrics: ApiMetrics,
    catalogs: Arc<CatalogCache>,
}

impl AppState {
    pub fn new(registry: Registry, pool: PgPool, settings: Settings) -> Self {
        Self {
            registry,
            pool,
            settings: Arc::new(settings),
            metrics: ApiMetrics::default(),
            catalogs: Arc::default(),
        }
    }
}

/// The router with every route; `state` carries the registry and the pool.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.limits.max_body_bytes;
    Router::new()
        .route("/v1/tenant", get(get_tenant))
        .route("/v1/tables", get(list_tables))
        .route(
            "/v1/tables/{table}",
            get(list_rows)
                .post(insert_rows)
                .patch(update_rows)
                .delete(delete_rows),
        )
        .route("/v1/tables/{table}/{id}", get(get_row))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .fallback(|| async { ApiError::not_found("not-found", "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Request span (route, method, tenant) and metrics.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let span = tracing::info_span!("request", %method, %route, tenant = tracing::field::Empty, status = tracing::field::Empty);
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

async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    m.tenants.set(state.registry.len() as i64);
    let idle = state.pool.num_idle() as i64;
    let size = state.pool.size() as i64;
    m.pool.get_or_create(&PoolLabel { state: "idle" }).set(idle);
    m.pool
        .get_or_create(&PoolLabel { state: "in_use" })
        .set(size - idle);
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

/// The request's tenant, resolved and authenticated.
pub struct TenantRequest {
    pub entry: Entry,
    pub schema: Ident,
    pub claims: Value,
}

fn host_of(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(header::HOST)?.to_str().ok()?;
    let host = match raw.rsplit_once(':') {
        Some((h, port))
            if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']')
                || raw.starts_with('[') =>
        {
            h.to_string()
        }
        _ => raw.to_string(),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Resolves the tenant of a request: Host (exact `spec.hosts`, then `<tenant>.<base domain>`),
/// `X-Tenant`, then the token's tenant claim. Sources that disagree are refused.
fn resolve(state: &AppState, headers: &HeaderMap, token: Option<&str>) -> Result<Entry, ApiError> {
    let mut found: Option<(&'static str, Entry)> = None;
    let mut consider = |source: &'static str, lookup: Lookup, id: &str| -> Result<(), ApiError> {
        let entry = match lookup {
            Lookup::Found(e) => e,
            Lookup::Unknown => return Err(ApiError::not_found("unknown-tenant", format!("no tenant {id:?} (from {source})"))),
            Lookup::Ambiguous(claimants) => {
                return Err(ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "ambiguous-tenant",
                    format!("{id:?} (from {source}) is claimed by several Tenants ({}); none is routable until that is resolved", claimants.join(", ")),
                ))
            }
        };
        if let Some((first, prev)) = &found {
            if prev.info.namespace != entry.info.namespace || prev.info.name != entry.info.name {
                return Err(ApiError::forbidden(
                    "tenant-mismatch",
                    format!(
                        "{first} names tenant {:?} but {source} names {:?}",
                        prev.info.name, entry.info.name
                    ),
                ));
            }
        } else {
            found = Some((source, entry));
        }
        Ok(())
    };
    if let Some(host) = host_of(headers) {
        match state.registry.by_host(&host) {
            Lookup::Unknown => {
                let sub = state
                    .settings
                    .base_domain
                    .as_deref()
                    .and_then(|base| host.strip_suffix(base)?.strip_suffix('.'))
                    .filter(|s| !s.is_empty() && !s.contains('.'));
                if let Some(name) = sub {
                    consider("host", state.registry.by_name(name), name)?;
                }
            }
            l => consider("host", l, &host)?,
        }
    }
    if let Some(v) = headers.get("x-tenant") {
        let name = v
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid-tenant", "X-Tenant must be ASCII"))?
            .trim()
            .to_string();
        consider("X-Tenant", state.registry.by_name(&name), &name)?;
    }
    if let Some(name) = token.and_then(auth::peek_tenant) {
        consider("token", state.registry.by_name(&name), &name)?;
    }
    found
        .map(|(_, e)| e)
        .ok_or_else(|| ApiError::bad_request("no-tenant", "the request names no tenant: use its host, an X-Tenant header or a token with a tenant claim"))
}

impl FromRequestParts<AppState> for TenantRequest {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = auth::bearer(&parts.headers);
        let entry = resolve(state, &parts.headers, token)?;
        tracing::Span::current().record("tenant", entry.info.name.as_str());
        let info = &entry.info;
        let schema = match (&info.schema, info.ready) {
            (Some(s), true) => Ident::parse("schema", s).map_err(ApiError::internal)?,
            _ => {
                return Err(ApiError::unavailable(
                    "tenant-not-ready",
                    format!("tenant {:?} is not ready yet", info.name),
                    5,
                ))
            }
        };
        let token = token.ok_or_else(|| {
            ApiError::unauthorized("a bearer token is required", "invalid_request")
        })?;
        let claims = auth::verify(token, entry.jwt_key.as_deref(), &state.settings.auth)?;
        match claims.get(auth::TENANT_CLAIM).and_then(Value::as_str) {
            Some(t) if t == info.name => {}
            Some(t) => {
                return Err(ApiError::forbidden(
                    "tenant-mismatch",
                    format!("the token is for tenant {t:?}, not {:?}", info.name),
                ))
            }
            None => {
                return Err(ApiError::forbidden(
                    "tenant-mismatch",
                    "the token carries no tenant claim",
                ))
            }
        }
        Ok(TenantRequest {
            entry,
            schema,
            claims,
        })
    }
}

/// Runs `f` in one transaction as the tenant role with the tenant schema as search_path.
async fn in_tenant<T, F>(
    state: &AppState,
    schema: &Ident,
    read_only: bool,
    f: F,
) -> Result<T, ApiError>
where
    F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ApiError>>,
{
    let mut conn = state.pool.acquire().await?;
    let mode = if read_only { "READ ONLY" } else { "READ WRITE" };
    let timeout = state.settings.limits.statement_timeout_ms;
    // One round trip: the schema is a validated identifier, the rest are constants.
    let begin = format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED {mode}; SET LOCAL ROLE {schema}; SET LOCAL search_path TO {schema}; SET LOCAL statement_timeout = {timeout}"
    );
    let mut tx = conn.begin_with(begin).await?;
    let out = f(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

async fn catalog(
    state: &AppState,
    t: &TenantRequest,
    conn: &mut PgConnection,
) -> Result<Arc<Catalog>, ApiError> {
    let version = t.entry.info.migration_version;
    let key = t.schema.as_str();
    if let Some((v, c)) = state
        .catalogs
        .entries
        .lock()
        .expect("catalog lock")
        .get(key)
    {
        if *v == version {
            return Ok(c.clone());
        }
    }
    let c = Arc::new(Catalog::load(conn, key).await?);
    state
        .catalogs
        .entries
        .lock()
        .expect("catalog lock")
        .insert(key.to_string(), (version, c.clone()));
    Ok(c)
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn params(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    let raw = raw.unwrap_or_default();
    serde_urlencoded_pairs(&raw)
}

fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    ApiError::bad_request("invalid-parameter", "query string is not valid UTF-8")
                })
        };
        out.push((dec(k)?, dec(v)?));
    }
    Ok(out)
}

fn limits(state: &AppState) -> Limits {
    let l = state.settings.limits;
    Limits {
        default_limit: l.default_limit,
        max_limit: l.max_limit,
        max_offset: l.max_offset,
    }
}

async fn get_tenant(t: TenantRequest) -> Response {
    let i = &t.entry.info;
    Json(json!({
        "name": i.name,
        "namespace": i.namespace,
        "displayName": i.display_name,
        "hosts": i.hosts,
        "schema": i.schema,
        "migrationVersion": i.migration_version,
    }))
    .into_response()
}

async fn list_tables(
    State(state): State<AppState>,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let schema = t.schema.clone();
    let st = state.clone();
    let c = in_tenant(&state, &schema, true, move |conn| {
        async move { catalog(&st, &t, conn).await }.boxed()
    })
    .await?;
    Ok(Json(json!({ "tables": c.tables.values().collect::<Vec<_>>() })).into_response())
}

/// Runs the statement `build` makes for `table` (looked up in the tenant's catalog) in the
/// tenant's transaction, and returns its JSON text.
async fn on_table<F>(
    state: &AppState,
    t: TenantRequest,
    table: String,
    read_only: bool,
    build: F,
) -> Result<String, ApiError>
where
    F: FnOnce(&str, &query::Table, &Limits) -> Result<query::Sql, ApiError> + Send + 'static,
{
    let schema = t.schema.clone();
    let st = state.clone();
    in_tenant(state, &schema, read_only, move |conn| {
        async move {
            let c = catalog(&st, &t, conn).await?;
            let sql = build(t.schema.as_str(), c.table(&table)?, &limits(&st))?;
            Ok(sql.fetch_json(conn).await?)
        }
        .boxed()
    })
    .await
}

async fn list_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let body = on_table(&state, t, table, true, move |schema, tbl, limits| {
        query::select(schema, tbl, &query::parse(&p, tbl, limits)?)
    })
    .await?;
    Ok(json_response(StatusCode::OK, body))
}

async fn get_row(
    State(state): State<AppState>,
    Path((table, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let body = on_table(&state, t, table, true, move |schema, tbl, limits| {
        let q = query::parse(&p, tbl, limits)?;
        if !q.filters.is_empty() || !q.order.is_empty() {
            return Err(ApiError::bad_request(
                "invalid-parameter",
                "only select= applies to a single row",
            ));
        }
        query::by_id(schema, tbl, &id, q.select.as_ref())
    })
    .await?;
    if body == "null" {
        return Err(ApiError::not_found(
            "row-not-found",
            "no row with that primary key",
        ));
    }
    Ok(json_response(StatusCode::OK, body))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid-body", format!("invalid JSON: {e}")))
}

async fn insert_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    t: TenantRequest,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value = parse_body(&body)?;
    let single = value.is_object();
    let rows = match value {
        Value::Array(rows) => rows,
        v @ Value::Object(_) => vec![v],
        _ => {
            return Err(ApiError::bad_request(
                "invalid-body",
                "expected a JSON object or an array of objects",
            ))
        }
    };
    let out = on_table(&state, t, table, false, move |schema, tbl, _| {
        query::insert(schema, tbl, rows)
    })
    .await?;
    let body = if single {
        let mut v: Value = serde_json::from_str(&out).map_err(ApiError::internal)?;
        v.as_array_mut()
            .and_then(|a| a.pop())
            .unwrap_or(Value::Null)
            .to_string()
    } else {
        out
    };
    Ok(json_response(StatusCode::CREATED, body))
}

/// Header that allows PATCH or DELETE without filters (every row of the table).
pub const ALL_ROWS_HEADER: &str = "x-tenantry-all-rows";

fn check_mass_change(
    headers: &HeaderMap,
    q: &query::Query,
    method: &Method,
) -> Result<(), ApiError> {
    if q.select.is_some() || !q.order.is_empty() || q.offset != 0 {
        return Err(ApiError::bad_request(
            "invalid-parameter",
            format!("{method} takes only column filters"),
        ));
    }
    let confirmed = headers.get(ALL_ROWS_HEADER).and_then(|v| v.to_str().ok()) == Some("true");
    if q.filters.is_empty() && !confirmed {
        return Err(ApiError::bad_request(
            "unfiltered-change",
            format!("{method} without filters would change every row; add filters or send {ALL_ROWS_HEADER}: true"),
        ));
    }
    Ok(())
}

async fn update_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    t: TenantRequest,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let patch = parse_body(&body)?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "invalid-body",
            "PATCH takes one JSON object",
        ));
    }
    let out = on_table(&state, t, table, false, move |schema, tbl, limits| {
        let q = query::parse(&p, tbl, limits)?;
        check_mass_change(&headers, &q, &Method::PATCH)?;
        query::update(schema, tbl, &q.filters, patch)
    })
    .await?;
    Ok(json_response(StatusCode::OK, out))
}

async fn delete_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let out = on_table(&state, t, table, false, move |schema, tbl, limits| {
        let q = query::parse(&p, tbl, limits)?;
        check_mass_change(&headers, &q, &Method::DELETE)?;
        query::delete(schema, tbl, &q.filters)
    })
    .await?;
    Ok(json_response(StatusCode::OK, out))
}

/// Runs the API until `shutdown` resolves: the registry watch in the background, the router
/// on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "tenantry API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
