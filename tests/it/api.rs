//! The data API against real PostgreSQL and a real apiserver: the registry follows Tenants,
//! requests resolve and authenticate, CRUD works, and every isolation attack fails with a
//! 4xx and no side effect.

use std::time::{Duration, Instant};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
    Router,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use kube::api::{Patch, PatchParams};
use serde_json::{json, Value};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tenantry::{
    api::{self, auth::AuthConfig, AppState, Limits, PoolConfig, Settings},
    domain::crd::Tenant,
    registry::{self, Registry},
};
use tower::ServiceExt;

use crate::common::*;

pub const POOL_SIZE: u32 = 4;

pub struct Api {
    pub router: Router,
    /// The operations routes (`/metrics`), which `tenantry api` serves on their own port.
    pub ops: Router,
    pub registry: Registry,
    /// The API's own data pool.
    pub data: api::Pool,
    /// A gateway session of the tests' own.
    pub pool: PgPool,
    _watch: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self._watch.abort();
    }
}

/// The gateway's connection string, from the Secret the operator wrote.
pub async fn gateway_uri(ns: &TestNs) -> String {
    let secrets = ns.secrets();
    let s = eventually("gateway Secret", Duration::from_secs(30), move || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("tenantry-gateway").await.ok().flatten() }
    })
    .await;
    secret_value(&s, "uri")
}

impl Api {
    /// An API serving the Tenants of `namespace` (all namespaces when `None`).
    pub async fn start(ns: &TestNs, namespace: Option<&str>) -> Self {
        Self::start_with_auth(
            ns,
            namespace,
            AuthConfig {
                leeway_secs: 5,
                ..AuthConfig::default()
            },
        )
        .await
    }

    pub async fn start_with_auth(ns: &TestNs, namespace: Option<&str>, auth: AuthConfig) -> Self {
        Self::start_with_limits(ns, namespace, auth, test_limits()).await
    }

    pub async fn start_with_limits(
        ns: &TestNs,
        namespace: Option<&str>,
        auth: AuthConfig,
        limits: Limits,
    ) -> Self {
        Self::start_with_pool(ns, namespace, auth, limits, test_pool()).await
    }

    pub async fn start_with_pool(
        ns: &TestNs,
        namespace: Option<&str>,
        auth: AuthConfig,
        limits: Limits,
        pool: PoolConfig,
    ) -> Self {
        Self::start_serving(ns, namespace, auth, limits, pool, 1).await
    }

    /// An API with pools to up to `max_servers` servers (`tenantry api --max-servers`).
    pub async fn start_with_servers(ns: &TestNs, max_servers: usize) -> Self {
        let auth = AuthConfig {
            leeway_secs: 5,
            ..AuthConfig::default()
        };
        Self::start_serving(
            ns,
            Some(&ns.name),
            auth,
            test_limits(),
            test_pool(),
            max_servers,
        )
        .await
    }

    async fn start_serving(
        ns: &TestNs,
        namespace: Option<&str>,
        auth: AuthConfig,
        limits: Limits,
        pool: PoolConfig,
        max_servers: usize,
    ) -> Self {
        let pool_config = pool;
        let uri = gateway_uri(ns).await;
        let data = api::connect(&uri, pool, false).await.expect("gateway pool");
        // A gateway session of the tests' own, opened when a test asks for it.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy(&uri)
            .expect("gateway URI");
        let config = registry::Config {
            namespaces: namespace.map(str::to_string).into_iter().collect(),
            base_domain: Some(BASE_DOMAIN.into()),
            signing_key: (ns.name.clone(), SIGNING_KEY_SECRET.into()),
        };
        let (registry, watch) = registry::watch(ns.client.clone(), &config);
        let settings = Settings {
            auth,
            limits,
            server: "default".into(),
        };
        let servers = (max_servers > 1).then(|| {
            api::ServerPools::new(
                ns.client.clone(),
                uri.clone(),
                pool_config,
                false,
                max_servers,
            )
        });
        let state = AppState::with_servers(registry.clone(), data.clone(), servers, settings);
        let router = api::router(state.clone());
        let ops = api::ops_router(state);
        Self {
            router,
            ops,
            registry,
            data,
            pool,
            _watch: watch,
        }
    }

    /// `/metrics`, from the operations routes.
    pub async fn scrape(&self) -> (StatusCode, String) {
        let res = self
            .ops
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let (status, bytes, headers) = self
            .call_raw(method, uri, headers, body.map(|b| b.to_string()))
            .await;
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v, headers)
    }

    /// Sends a request with the body exactly as given (JSON content type when there is one)
    /// and returns the answer's bytes unparsed.
    pub async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> (StatusCode, axum::body::Bytes, axum::http::HeaderMap) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b)
            }
            None => Body::empty(),
        };
        let res = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, bytes, headers)
    }
}

/// The limits the tests' API runs with: the defaults (so a tenant's share of the 4-connection
/// pool is one request in flight), with a smaller body limit.
pub fn test_limits() -> Limits {
    Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `tenant` signed with `key`.
pub fn token_with(tenant: &str, key: &[u8], exp_in: i64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"tenant": tenant, "sub": "user-1", "exp": (now() as i64 + exp_in)}),
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// The tests' pool: [`POOL_SIZE`] connections (one group), the default caches and waits.
pub fn test_pool() -> PoolConfig {
    PoolConfig {
        size: POOL_SIZE,
        acquire_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(600),
        statement_cache: api::pool::STATEMENT_CACHE,
        home_wait: api::pool::HOME_WAIT,
    }
}

/// A valid token for the Tenant `name`, signed with the key from its Secret.
pub async fn token(ns: &TestNs, name: &str) -> String {
    let s = ns.secrets().get(&format!("{name}-db")).await.unwrap();
    token_with(name, secret_value(&s, "jwt-key").as_bytes(), 300)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Waits until the API routes `name` (Ready and known to the registry).
pub async fn wait_routable(api: &Api, name: &str, tok: &str) {
    let auth = bearer(tok);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("x-tenant", name), ("authorization", &auth)],
                None,
            )
            .await;
        if s == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tenant {name} never became routable (last status {s})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_round_trip_and_constraint_errors() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_hosts(&["acme.example.com"]))
        .await;
    wait_ready(&ns, "acme").await;
    let api = Api::start(&ns, Some(&ns.name)).await;
    let tok = token(&ns, "acme").await;
    wait_routable(&api, "acme", &tok).await;
    let auth = bearer(&tok);
    let h = [
        ("host", "acme.example.com"),
        ("authorization", auth.as_str()),
    ];

    let (s, v, _) = api.call(Method::GET, "/v1/tenant", &h, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "acme");
    assert_eq!(v["migrationVersion"], 2);

    let (s, v, _) = api.call(Method::GET, "/v1/tables", &h, None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["members", "projects", "tasks"],
        "the migration history is not served"
    );

    let (s, p, _) = api
        .call(
            Method::POST,
            "/v1/tables/projects",
            &h,
            Some(json!({"name": "launch"})),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let pid = p["id"].as_i64().unwrap();
    let (s, tasks, _) = api
        .call(
            Method::POST,
            "/v1/tables/tasks",
            &h,
            Some(json!([
                {"project_id": pid, "title": "write docs"},
                {"project_id": pid, "title": "ship", "status": "doing"},
                {"project_id": pid, "title": "celebrate", "due_date": "2030-01-01"}
            ])),
        )
        .await;
    assert_eq!(s, 201, "{tasks}");
    assert_eq!(tasks.as_array().unwrap().len(), 3);

    let (s, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/tasks?status=eq.todo&order=title.desc&select=id,title",
            &h,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!([{"id": tasks[0]["id"], "title": "write docs"}, {"id": tasks[2]["id"], "title": "celebrate"}])
    );
    let (_, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/tasks?due_date=is.null&title=like.*e*&limit=1&order=id",
            &h,
            None,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["title"], "write docs");
    let (_, v, _) = api
        .call(
            Method::GET,
            &format!(
                "/v1/tables/tasks?id=in.({},{})",
                tasks[0]["id"], tasks[1]["id"]
            ),
            &h,
            None,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (_, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/tasks?due_date=gte.2029-12-31",
            &h,
            None,
        )
        .await;
    assert_eq!(v[0]["title"], "celebrate");

    let id = tasks[1]["id"].as_i64().unwrap();
    let (s, v, _) = api
        .call(Method::GET, &format!("/v1/tables/tasks/{id}"), &h, None)
        .await;
    assert_eq!((s, v["title"].as_str()), (StatusCode::OK, Some("ship")));
    let (s, v, _) = api
        .call(Method::GET, "/v1/tables/tasks/999999", &h, None)
        .await;
    assert_eq!(s, 404);
    assert_eq!(v["type"], "https://tenantry.dev/problems/row-not-found");

    let (s, v, _) = api
        .call(
            Method::PATCH,
            &format!("/v1/tables/tasks?id=eq.{id}"),
            &h,
            Some(json!({"status": "done"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["status"], "done");
    let (s, v, _) = api
        .call(
            Method::PATCH,
            "/v1/tables/tasks",
            &h,
            Some(json!({"status": "done"})),
        )
        .await;
    assert_eq!(
        (s, v["type"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("https://tenantry.dev/problems/unfiltered-change")
        )
    );
    let (s, _, _) = api.call(Method::DELETE, "/v1/tables/tasks", &h, None).await;
    assert_eq!(s, 400);
    let (s, v, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/tables/tasks?id=eq.{id}"),
            &h,
            None,
        )
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (StatusCode::OK, 1));

    // Constraint violations are client errors with stable types, never 500.
    for (body, table, status, kind) in [
        (
            json!({"name": "launch"}),
            "projects",
            409,
            "unique-violation",
        ),
        (
            json!({"project_id": 424242, "title": "orphan"}),
            "tasks",
            409,
            "foreign-key-violation",
        ),
        (
            json!({"project_id": pid, "title": "x", "status": "bogus"}),
            "tasks",
            422,
            "check-violation",
        ),
        (
            json!({"project_id": pid}),
            "tasks",
            422,
            "not-null-violation",
        ),
        (
            json!({"id": 5, "name": "forced id"}),
            "projects",
            422,
            "generated-column",
        ),
        (
            json!({"project_id": "not a number", "title": "x"}),
            "tasks",
            400,
            "invalid-body",
        ),
        (
            json!({"project_id": "5", "title": "a string is not an integer"}),
            "tasks",
            400,
            "invalid-body",
        ),
        (
            json!({"project_id": pid, "title": {}}),
            "tasks",
            400,
            "invalid-body",
        ),
        (
            json!({"project_id": pid, "title": null}),
            "tasks",
            422,
            "not-null-violation",
        ),
        (json!({"nope": 1}), "tasks", 400, "unknown-column"),
        // An integer written as a double is read exactly (not ...574.5) and reaches
        // PostgreSQL, whose foreign key refuses it.
        (
            json!({"project_id": pid, "title": "x", "assignee_id": -3642244945607574.0}),
            "tasks",
            409,
            "foreign-key-violation",
        ),
        // -2^63 as a double: also the reading of numbers below bigint's range.
        (
            json!({"project_id": pid, "title": "x", "assignee_id": -9.223372036854776e18}),
            "tasks",
            400,
            "invalid-body",
        ),
    ] {
        let (s, v, _) = api
            .call(
                Method::POST,
                &format!("/v1/tables/{table}"),
                &h,
                Some(body.clone()),
            )
            .await;
        assert_eq!(s.as_u16(), status, "{body}: {v}");
        assert_eq!(
            v["type"],
            format!("https://tenantry.dev/problems/{kind}"),
            "{body}: {v}"
        );
    }
    let (s, v, _) = api
        .call(Method::GET, "/v1/tables/tasks?id=eq.abc", &h, None)
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _, _) = api
        .call(Method::GET, "/v1/tables/tasks?id=between.1", &h, None)
        .await;
    assert_eq!(s, 400);
    let big = json!({"name": "x".repeat(100 * 1024)});
    let (s, _, _) = api
        .call(Method::POST, "/v1/tables/projects", &h, Some(big))
        .await;
    assert_eq!(s, 413);

    let (s, doc, _) = api.call(Method::GET, "/openapi.json", &[], None).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/tables/{table}"]["get"].is_object());

    // The tenant's own document: a path per table, rows typed from the columns.
    let (s, doc, _) = api.call(Method::GET, "/v1/openapi.json", &h, None).await;
    assert_eq!(s, 200, "{doc}");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["tasks.Row"]["properties"]["project_id"],
        json!({"type": "integer", "minimum": i64::MIN + 1, "maximum": i64::MAX})
    );
    assert_eq!(
        schemas["tasks.Insert"]["required"],
        json!(["project_id", "title"])
    );
    assert!(schemas["tasks.Insert"]["properties"]["id"].is_null());
    assert!(doc["paths"]["/v1/tables/tasks/{id}"]["get"].is_object());
    assert!(doc["paths"]["/v1/tables/{table}"].is_null());
    let filter = doc["paths"]["/v1/tables/tasks"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "due_date")
        .unwrap()["schema"]["pattern"]
        .as_str()
        .unwrap()
        .to_string();
    let re = regex::Regex::new(&filter).unwrap();
    assert!(re.is_match("gte.2024-02-29") && !re.is_match("gte.2023-02-29"));
    let (s, _, _) = api.call(Method::GET, "/v1/openapi.json", &[], None).await;
    assert_eq!(s, 401);
}

/// (what, uri, headers, expected status)
type Attack<'a> = (&'a str, String, Vec<(&'a str, String)>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_attacks_fail_with_4xx_and_change_nothing() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme").with_hosts(&["acme.example.com"]))
        .await;
    ns.create(Tenant::test("globex").with_hosts(&["globex.example.com"]))
        .await;
    wait_ready(&ns, "acme").await;
    wait_ready(&ns, "globex").await;
    let api = Api::start(&ns, Some(&ns.name)).await;
    let acme = token(&ns, "acme").await;
    let globex = token(&ns, "globex").await;
    wait_routable(&api, "acme", &acme).await;
    wait_routable(&api, "globex", &globex).await;
    let g = bearer(&globex);
    let (s, _, _) = api
        .call(
            Method::POST,
            "/v1/tables/projects",
            &[("x-tenant", "globex"), ("authorization", &g)],
            Some(json!({"name": "secret plan"})),
        )
        .await;
    assert_eq!(s, 201);

    let a = bearer(&acme);
    let acme_key = secret_value(&ns.secrets().get("acme-db").await.unwrap(), "jwt-key");
    let globex_schema = ns.schema("globex");
    let none_alg = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(br#"{"alg":"none","typ":"JWT"}"#),
            e.encode(format!(r#"{{"tenant":"globex","exp":{}}}"#, now() + 60))
        )
    };
    let forged = token_with("globex", acme_key.as_bytes(), 300);
    let expired = token_with("acme", acme_key.as_bytes(), -3600);
    let cases: Vec<Attack> = vec![
        (
            "other tenant's token on acme's host",
            "/v1/tables/projects".into(),
            vec![
                ("host", "acme.example.com".into()),
                ("authorization", g.clone()),
            ],
            403,
        ),
        (
            "acme token, X-Tenant globex",
            "/v1/tables/projects".into(),
            vec![("x-tenant", "globex".into()), ("authorization", a.clone())],
            403,
        ),
        (
            "host globex, X-Tenant acme",
            "/v1/tables/projects".into(),
            vec![
                ("host", "globex.example.com".into()),
                ("x-tenant", "acme".into()),
                ("authorization", a.clone()),
            ],
            403,
        ),
        (
            "base-domain host globex with acme token",
            "/v1/tables/projects".into(),
            vec![
                ("host", "globex.tenants.test".into()),
                ("authorization", a.clone()),
            ],
            403,
        ),
        (
            "globex claim signed with acme's key",
            "/v1/tables/projects".into(),
            vec![("authorization", bearer(&forged))],
            401,
        ),
        (
            "alg none",
            "/v1/tables/projects".into(),
            vec![("authorization", bearer(&none_alg))],
            401,
        ),
        (
            "expired",
            "/v1/tables/projects".into(),
            vec![
                ("x-tenant", "acme".into()),
                ("authorization", bearer(&expired)),
            ],
            401,
        ),
        (
            "no token",
            "/v1/tables/projects".into(),
            vec![("x-tenant", "globex".into())],
            401,
        ),
        (
            "garbage token",
            "/v1/tables/projects".into(),
            vec![
                ("x-tenant", "globex".into()),
                ("authorization", "Bearer a.b.c".into()),
            ],
            401,
        ),
        (
            "unknown tenant",
            "/v1/tables/projects".into(),
            vec![("x-tenant", "initech".into()), ("authorization", a.clone())],
            404,
        ),
        (
            "schema-qualified table",
            format!("/v1/tables/{globex_schema}.projects"),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "quoted injection",
            "/v1/tables/%22projects%22%3B%20drop%20table%20projects".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "catalog table",
            "/v1/tables/pg_catalog.pg_authid".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "catalog table, bare",
            "/v1/tables/pg_authid".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "path traversal",
            "/v1/tables/..%2F..%2Fprojects".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "migration history",
            "/v1/tables/tenantry_migrations".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "unicode look-alike",
            "/v1/tables/pr%D0%BEjects".into(),
            vec![("authorization", a.clone())],
            404,
        ),
        (
            "search_path parameter",
            "/v1/tables/projects?search_path=eq.public".into(),
            vec![("authorization", a.clone())],
            400,
        ),
        (
            "role parameter",
            "/v1/tables/projects?role=eq.postgres".into(),
            vec![("authorization", a.clone())],
            400,
        ),
        (
            "SQL in select",
            "/v1/tables/projects?select=name,(select%20current_user)".into(),
            vec![("authorization", a.clone())],
            400,
        ),
        (
            "SQL in order",
            "/v1/tables/projects?order=name;drop%20table%20projects".into(),
            vec![("authorization", a.clone())],
            400,
        ),
        (
            "SQL in a filter value",
            "/v1/tables/projects?id=eq.1;%20drop%20table%20projects".into(),
            vec![("authorization", a.clone())],
            400,
        ),
    ];
    for (what, uri, headers, want) in &cases {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, v, h) = api.call(Method::GET, uri, &hs, None).await;
        assert_eq!(s.as_u16(), *want, "{what}: {v}");
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/problem+json"),
            "{what}"
        );
        if *want == 401 {
            assert!(h.contains_key("www-authenticate"), "{what}");
        }
    }
    // A value that looks like SQL is just a value.
    let (s, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/projects?name=eq.x'%20OR%20'1'='1",
            &[("authorization", &a)],
            None,
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
    // Writes with hostile input leave the other tenant untouched.
    let (s, _, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/tables/{globex_schema}.projects?id=gt.0"),
            &[("authorization", &a)],
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/projects",
            &[("x-tenant", "globex"), ("authorization", &g)],
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["name"], "secret plan");
    let (_, v, _) = api
        .call(
            Method::GET,
            "/v1/tables/projects",
            &[("authorization", &a)],
            None,
        )
        .await;
    assert_eq!(v, json!([]), "acme sees none of globex's rows");

    // PostgreSQL itself refuses: even a gateway connection switched to acme's role cannot
    // read globex's tables, whatever our code might send.
    let mut conn = api.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::Executor::execute(
        &mut *tx,
        format!("SET LOCAL ROLE \"{}\"", ns.schema("acme")).as_str(),
    )
    .await
    .unwrap();
    let err = sqlx::Executor::execute(
        &mut *tx,
        format!("SELECT * FROM \"{globex_schema}\".projects").as_str(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("42501")
    );
    drop(tx);
    // And the gateway itself, with no role switched, has no rights of its own (NOINHERIT).
    let err = sqlx::query(&format!("SELECT * FROM \"{globex_schema}\".projects"))
        .fetch_all(&mut *conn)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("42501")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_follows_tenants_within_a_second() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let api = Api::start(&ns, Some(&ns.name)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.registry.is_synced() {
        assert!(Instant::now() < deadline, "registry never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, _, _) = api.call(Method::GET, "/readyz", &[], None).await;
    assert_eq!(s, 200);

    ns.create(Tenant::test("fresh").with_hosts(&["fresh.example.com"]))
        .await;
    wait_ready(&ns, "fresh").await;
    let ready_at = Instant::now();
    let tok = token(&ns, "fresh").await;
    wait_routable(&api, "fresh", &tok).await;
    let lag = ready_at.elapsed();
    assert!(lag < Duration::from_secs(1), "routable {lag:?} after Ready");

    let auth = bearer(&tok);
    ns.tenants()
        .patch(
            "fresh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hosts": ["moved.example.com"]}})),
        )
        .await
        .unwrap();
    let changed = Instant::now();
    // A host that matches no Tenant is not a tenant source (the token still names the
    // tenant), so watch the registry's host index itself.
    loop {
        let moved = matches!(
            api.registry.by_host("moved.example.com"),
            tenantry::registry::Lookup::Found(_)
        );
        let old_gone = matches!(
            api.registry.by_host("fresh.example.com"),
            tenantry::registry::Lookup::Unknown
        );
        if moved && old_gone {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "host change not picked up within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, _, _) = api
        .call(
            Method::GET,
            "/v1/tenant",
            &[("host", "moved.example.com"), ("authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(s, 200);

    delete_tenant(&ns, "fresh").await;
    let deleted = Instant::now();
    loop {
        let (s, _, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("x-tenant", "fresh"), ("authorization", &auth)],
                None,
            )
            .await;
        if s == 404 || s == 503 {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "deletion not picked up within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A Tenant that is not Ready answers 503 with Retry-After.
    ns.create(Tenant::test("broken").with_schema("public"))
        .await;
    let t = token_with("broken", b"0123456789abcdef0123456789abcdef", 60);
    let tb = bearer(&t);
    let start = Instant::now();
    loop {
        let (s, v, h) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("x-tenant", "broken"), ("authorization", &tb)],
                None,
            )
            .await;
        if s == 503 {
            assert_eq!(h["retry-after"], "5");
            assert_eq!(v["type"], "https://tenantry.dev/problems/tenant-not-ready");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "got {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_in_two_namespaces_is_ambiguous_and_unroutable() {
    let ns1 = TestNs::new().await;
    let ns2 = TestNs::new().await;
    let _c1 = RunningController::start(&ns1).await;
    let _c2 = RunningController::start(&ns2).await;
    let name = format!("dup{}", random_suffix());
    ns1.create(Tenant::test(&name)).await;
    ns2.create(Tenant::test(&name)).await;
    wait_ready(&ns1, &name).await;
    wait_ready(&ns2, &name).await;
    let api = Api::start(&ns1, None).await;
    let tok = token(&ns1, &name).await;
    let auth = bearer(&tok);
    let start = Instant::now();
    loop {
        let (s, v, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("x-tenant", &name), ("authorization", &auth)],
                None,
            )
            .await;
        if s == 421 {
            assert_eq!(v["type"], "https://tenantry.dev/problems/ambiguous-tenant");
            assert!(v["detail"].as_str().unwrap().contains(&ns2.name), "{v}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "got {s}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_serve_as_a_superuser() {
    let err = api::connect(
        &env().database_url,
        PoolConfig {
            size: 1,
            acquire_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(60),
            statement_cache: api::pool::STATEMENT_CACHE,
            home_wait: api::pool::HOME_WAIT,
        },
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("refusing to serve"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tenants_in_parallel_each_see_only_their_own_rows_within_the_pool() {
    const TENANTS: usize = 12;
    const REQUESTS: usize = 20;
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    let names: Vec<String> = (0..TENANTS).map(|i| format!("c{i:02}")).collect();
    for n in &names {
        ns.create(Tenant::test(n)).await;
    }
    for n in &names {
        wait_ready(&ns, n).await;
    }
    // Every tenant's requests arrive at once: no per-tenant cap here (its 429s are tested in
    // hostile::api), only the pool's bound.
    let limits = Limits {
        tenant_max_concurrency: REQUESTS as u32,
        ..test_limits()
    };
    let api = std::sync::Arc::new(
        Api::start_with_limits(&ns, Some(&ns.name), AuthConfig::default(), limits).await,
    );
    let mut tokens = Vec::new();
    for n in &names {
        let t = token(&ns, n).await;
        wait_routable(&api, n, &t).await;
        let (s, _, _) = api
            .call(
                Method::POST,
                "/v1/tables/projects",
                &[("authorization", &bearer(&t))],
                Some(json!([{"name": format!("{n}-a")}, {"name": format!("{n}-b")}])),
            )
            .await;
        assert_eq!(s, 201);
        tokens.push(t);
    }
    let gateway = gateway_role(&ns);
    let pg = pg().await;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pg, gateway, peak, sampling) =
            (pg.clone(), gateway.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
                        .bind(&gateway)
                        .fetch_one(&pg)
                        .await
                        .unwrap();
                peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        for _ in 0..REQUESTS {
            let api = api.clone();
            let (n, t) = (n.clone(), tokens[i].clone());
            tasks.push(tokio::spawn(async move {
                let (s, v, _) = api
                    .call(
                        Method::GET,
                        "/v1/tables/projects?order=name",
                        &[("authorization", &bearer(&t))],
                        None,
                    )
                    .await;
                assert_eq!(s, 200, "{v}");
                let got: Vec<&str> = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["name"].as_str().unwrap())
                    .collect();
                assert_eq!(
                    got,
                    [format!("{n}-a"), format!("{n}-b")],
                    "tenant {n} saw {got:?}"
                );
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak >= 1 && peak <= POOL_SIZE as i64,
        "peak gateway connections {peak} (pool {POOL_SIZE})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_issuer_tokens_are_accepted_with_exactly_their_algorithm() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    // An RS256 key pair, as a platform identity provider would have.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let public = dir.path().join("public.pem");
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        assert!(std::process::Command::new("openssl")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let platform = api::auth::PlatformKey::from_file(&public, "RS256").unwrap();
    let auth = AuthConfig {
        issuer: Some("https://id.example.com".into()),
        audience: Some("tenantry".into()),
        leeway_secs: 5,
        platform: Some(platform),
    };
    let api = Api::start_with_auth(&ns, Some(&ns.name), auth).await;
    let claims = |tenant: &str, iss: &str| json!({"tenant": tenant, "sub": "u", "iss": iss, "aud": "tenantry", "exp": now() + 300});
    let private = std::fs::read(&key).unwrap();
    let rs = |c: Value| {
        encode(
            &Header::new(Algorithm::RS256),
            &c,
            &EncodingKey::from_rsa_pem(&private).unwrap(),
        )
        .unwrap()
    };
    let good = rs(claims("acme", "https://id.example.com"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("authorization", &bearer(&good))],
                None,
            )
            .await;
        if s == 200 {
            assert_eq!(v["name"], "acme");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "platform token never accepted: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wrong issuer; and the classic confusion: HS256 "signed" with the public key as secret.
    let wrong_iss = rs(claims("acme", "https://evil.example.com"));
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims("acme", "https://id.example.com"),
        &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
    )
    .unwrap();
    for (what, t) in [
        ("wrong issuer", wrong_iss),
        ("HS256 with the RSA public key", confused),
    ] {
        let (s, v, _) = api
            .call(
                Method::GET,
                "/v1/tenant",
                &[("authorization", &bearer(&t))],
                None,
            )
            .await;
        assert_eq!(s, 401, "{what}: {v}");
    }
}

/// The per-connection statement cache is bounded on the server too: with room for two
/// statements, five query shapes leave two prepared (plus the settings statement) on the
/// one connection, the evicted ones closed, and an evicted shape served again by preparing
/// it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_statements_are_closed_on_the_server_and_prepared_again() {
    let ns = TestNs::new().await;
    let _ctl = RunningController::start(&ns).await;
    ns.create(Tenant::test("acme")).await;
    wait_ready(&ns, "acme").await;
    let pool = PoolConfig {
        size: 1,
        acquire_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(600),
        statement_cache: 2,
        home_wait: api::pool::HOME_WAIT,
    };
    let api = Api::start_with_pool(
        &ns,
        Some(&ns.name),
        AuthConfig {
            leeway_secs: 5,
            ..AuthConfig::default()
        },
        test_limits(),
        pool,
    )
    .await;
    let tok = token(&ns, "acme").await;
    wait_routable(&api, "acme", &tok).await;
    let auth = bearer(&tok);
    let h = [("authorization", auth.as_str())];
    let (s, v, _) = api
        .call(
            Method::POST,
            "/v1/tables/projects",
            &h,
            Some(json!({"name": "one", "description": "first"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    // The catalog statement, then one statement per shape.
    let shapes = [
        "/v1/tables/projects?select=id",
        "/v1/tables/projects?select=name",
        "/v1/tables/projects?select=id,name",
        "/v1/tables/projects?select=description",
        "/v1/tables/projects?select=name,description",
    ];
    for uri in shapes {
        let (s, v, _) = api.call(Method::GET, uri, &h, None).await;
        assert_eq!(s, 200, "{uri}: {v}");
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{uri}: {v}");
    }
    let prepared = || async {
        let idle = api.data.inspect_idle().await.unwrap();
        idle.iter().map(|s| s.prepared).collect::<Vec<_>>()
    };
    assert_eq!(prepared().await, [3]);
    // The first shape was evicted long ago: prepared again, same answer.
    let (s, v, _) = api.call(Method::GET, shapes[0], &h, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["id"], 1, "{v}");
    assert_eq!(prepared().await, [3]);
}
