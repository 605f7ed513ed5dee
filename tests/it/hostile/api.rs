//! Attacks on the data API with a tenant's own token (and its own tables): each test plays one
//! attack through the router, against the real PostgreSQL, and checks that it fails with a
//! problem+json answer, or does exactly what was asked and nothing more.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Executor, PgPool};
use tenantry::{
    api::{auth::AuthConfig, pool::home, Limits, PoolConfig},
    domain::crd::Tenant,
    registry::Lookup,
};

use crate::{
    api::{test_limits, test_pool, token, Api, POOL_SIZE},
    common::*,
};

/// Ready tenants, the operator that provisioned them, and an API that knows them but has not
/// yet read any of their catalogs (so tables created by [`Stage::as_owner`] are served).
struct Stage {
    ns: TestNs,
    _ctl: RunningController,
    api: Api,
    pg: PgPool,
}

/// An answer, with its body as the exact text the API sent.
struct Answer {
    status: StatusCode,
    text: String,
    headers: HeaderMap,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The problem kind (last segment of `type`), after checking the problem+json shape.
    #[track_caller]
    fn problem(&self) -> String {
        let ct = self.headers["content-type"].to_str().unwrap();
        assert_eq!(ct, "application/problem+json", "{}", self.text);
        let v = self.json();
        assert_eq!(v["status"], self.status.as_u16(), "{v}");
        v["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("https://tenantry.dev/problems/"))
            .unwrap_or_else(|| panic!("no problem type in {v}"))
            .to_string()
    }

    /// The `key` of each row of a JSON array answer, in order.
    #[track_caller]
    fn column(&self, key: &str) -> Vec<Value> {
        assert!(self.status.is_success(), "{} {}", self.status, self.text);
        self.json()
            .as_array()
            .unwrap_or_else(|| panic!("not an array: {}", self.text))
            .iter()
            .map(|r| r[key].clone())
            .collect()
    }
}

impl Stage {
    async fn new(names: &[&str]) -> Self {
        Self::with_auth(
            names,
            AuthConfig {
                leeway_secs: 5,
                ..AuthConfig::default()
            },
        )
        .await
    }

    async fn with_auth(names: &[&str], auth: AuthConfig) -> Self {
        Self::with_limits(names, auth, test_limits()).await
    }

    /// A stage whose API allows each tenant `share` requests in flight (these tests need one
    /// tenant on several connections at once) and waits `lock_ms` for a lock (0: the
    /// statement timeout only).
    async fn sharing(names: &[&str], share: u32, lock_ms: u64) -> Self {
        let limits = Limits {
            tenant_max_concurrency: share,
            lock_timeout_ms: lock_ms,
            ..test_limits()
        };
        let auth = AuthConfig {
            leeway_secs: 5,
            ..AuthConfig::default()
        };
        Self::with_limits(names, auth, limits).await
    }

    async fn with_limits(names: &[&str], auth: AuthConfig, limits: Limits) -> Self {
        Self::in_ns(TestNs::new().await, names, auth, limits, test_pool()).await
    }

    async fn in_ns(
        ns: TestNs,
        names: &[&str],
        auth: AuthConfig,
        limits: Limits,
        pool: PoolConfig,
    ) -> Self {
        let ctl = RunningController::start(&ns).await;
        for n in names {
            ns.create(Tenant::test(n)).await;
        }
        for n in names {
            wait_ready(&ns, n).await;
        }
        let api = Api::start_with_pool(&ns, Some(&ns.name), auth, limits, pool).await;
        // Routable: known, Ready, with its key; asked of the registry, not with a request, so
        // that no catalog is read yet and stages with strict token rules need no token here.
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in names {
            while !matches!(api.registry.by_name(n),
                Lookup::Found(e) if e.info.ready && e.jwt_key.is_some())
            {
                assert!(Instant::now() < deadline, "tenant {n} never routable");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self {
            ns,
            _ctl: ctl,
            api,
            pg: pg().await,
        }
    }

    fn schema(&self, tenant: &str) -> String {
        self.ns.schema(tenant)
    }

    /// Runs `sql` in the tenant's schema as its owner role, as a migration would; objects it
    /// creates get the app role's DML grants from the schema's default privileges.
    async fn as_owner(&self, tenant: &str, sql: &str) {
        let schema = self.schema(tenant);
        self.pg
            .execute(
                format!(
                    "BEGIN; SET LOCAL ROLE \"{schema}_owner\"; SET LOCAL search_path TO \"{schema}\";
                     {sql};
                     COMMIT"
                )
                .as_str(),
            )
            .await
            .unwrap_or_else(|e| panic!("as owner of {schema}: {e}"));
    }

    /// Sends a request with `tenant`'s token (`X-Tenant` too) and `body` as the exact text.
    async fn send(&self, method: Method, uri: &str, tok: &str, body: Option<&str>) -> Answer {
        self.send_with(
            method,
            uri,
            &[("authorization", &format!("Bearer {tok}"))],
            body,
        )
        .await
    }

    async fn send_with(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Answer {
        let (status, bytes, headers) = self
            .api
            .call_raw(method, uri, headers, body.map(str::to_string))
            .await;
        Answer {
            status,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
            headers,
        }
    }

    async fn count(&self, tenant: &str, table: &str, filter: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".\"{table}\" WHERE {filter}",
            self.schema(tenant)
        ))
        .fetch_one(&self.pg)
        .await
        .unwrap()
    }
}

/// Attack: a filter value longer or more precise than its column, which a cast to the
/// column's full type truncates or rounds onto another row — `DELETE ?code=eq.abcdef` on a
/// `varchar(3)` column deleting the row `abc`, `eq.1.005` on `numeric(10,2)` matching `1.01`,
/// and the same through `in.(…)`, `char(3)`, `timestamp(0)` and a `varchar(3)` primary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_values_are_not_cut_to_the_column_type() {
    let s = Stage::new(&["acme"]).await;
    s.as_owner(
        "acme",
        "CREATE TABLE codes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
           code varchar(3) NOT NULL, fixed char(3), amount numeric(10,2) NOT NULL, at timestamp(0));
         INSERT INTO codes (code, fixed, amount, at)
           VALUES ('abc', 'abc', 1.01, '2030-01-01 00:00:00'), ('xyz', 'xyz', 2.00, NULL);
         CREATE TABLE tags (code varchar(3) PRIMARY KEY, label text);
         INSERT INTO tags VALUES ('abc', 'the real one')",
    )
    .await;
    let tok = token(&s.ns, "acme").await;

    // The exact values still match.
    for q in [
        "code=eq.abc",
        "fixed=eq.abc",
        "amount=eq.1.01",
        "amount=in.(1.01,7)",
        "at=eq.2030-01-01T00:00:00",
    ] {
        let a = s
            .send(Method::GET, &format!("/v1/tables/codes?{q}"), &tok, None)
            .await;
        assert_eq!(a.column("code"), [json!("abc")], "{q}");
    }
    // Values the column type would cut down to an existing row match nothing.
    for q in [
        "code=eq.abcdef",
        "code=in.(abcdef,xyzzy)",
        "fixed=eq.abcdef",
        "amount=eq.1.005",
        "amount=in.(1.005,2.004)",
        "at=eq.2030-01-01T00:00:00.4",
    ] {
        let a = s
            .send(Method::GET, &format!("/v1/tables/codes?{q}"), &tok, None)
            .await;
        assert_eq!(a.column("code"), Vec::<Value>::new(), "{q}");
    }
    let a = s
        .send(
            Method::DELETE,
            "/v1/tables/codes?code=eq.abcdef",
            &tok,
            None,
        )
        .await;
    assert_eq!(a.column("code"), Vec::<Value>::new());
    let a = s
        .send(
            Method::PATCH,
            "/v1/tables/codes?amount=in.(1.005,2.004)",
            &tok,
            Some(r#"{"code": "zzz"}"#),
        )
        .await;
    assert_eq!(a.column("code"), Vec::<Value>::new());
    let a = s
        .send(Method::GET, "/v1/tables/tags/abcdef", &tok, None)
        .await;
    assert_eq!(
        (a.status, a.problem().as_str()),
        (StatusCode::NOT_FOUND, "row-not-found")
    );
    assert_eq!(s.count("acme", "codes", "code IN ('abc', 'xyz')").await, 2);
    assert_eq!(s.count("acme", "tags", "true").await, 1);

    // The catalog still shows each column's full type.
    let a = s.send(Method::GET, "/v1/tables", &tok, None).await;
    let tables = a.json();
    let codes = tables["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "codes")
        .unwrap()
        .clone();
    let types: Vec<&str> = codes["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "bigint",
            "character varying(3)",
            "character(3)",
            "numeric(10,2)",
            "timestamp(0) without time zone"
        ]
    );
}

/// A query parameter value, percent-encoded.
fn enc(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Attack: an `in.(…)` item with a comma inside its quotes, `in.("Smith, John")`, split at
/// the comma so that a DELETE removes the rows `Smith` and ` John` instead of `Smith, John`;
/// and an unterminated quote, which must be refused rather than guessed at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_in_list_items_keep_their_commas() {
    let s = Stage::new(&["acme"]).await;
    let tok = token(&s.ns, "acme").await;
    let names = [
        "Smith",
        "John",
        " John",
        "Smith, John",
        r#"say "hi""#,
        r"back\slash",
        "a)b",
    ];
    let rows: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"email": format!("m{i}@acme.io"), "display_name": n}))
        .collect();
    let a = s
        .send(
            Method::POST,
            "/v1/tables/members",
            &tok,
            Some(&Value::Array(rows).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let names_of = |list: &str| format!("/v1/tables/members?display_name=in.{}", enc(list));

    let a = s
        .send(Method::GET, &names_of(r#"("Smith, John")"#), &tok, None)
        .await;
    assert_eq!(a.column("display_name"), [json!("Smith, John")]);
    let a = s
        .send(
            Method::GET,
            &format!(
                "{}&order=id",
                names_of(r#"( "a)b" , Smith,"say \"hi\"", "back\\slash")"#)
            ),
            &tok,
            None,
        )
        .await;
    assert_eq!(
        a.column("display_name"),
        [
            json!("Smith"),
            json!(r#"say "hi""#),
            json!(r"back\slash"),
            json!("a)b")
        ]
    );

    // Malformed lists are refused, and delete nothing.
    for bad in [
        r#"("Smith, John)"#,
        r#"("Smith" John)"#,
        r#"(Smith, "John)"#,
        r#"("a\")"#,
    ] {
        let a = s.send(Method::DELETE, &names_of(bad), &tok, None).await;
        assert_eq!(
            (a.status, a.problem().as_str()),
            (StatusCode::BAD_REQUEST, "invalid-filter"),
            "{bad}: {}",
            a.text
        );
    }
    assert_eq!(s.count("acme", "members", "true").await, names.len() as i64);

    let a = s
        .send(Method::DELETE, &names_of(r#"("Smith, John")"#), &tok, None)
        .await;
    assert_eq!(a.column("display_name"), [json!("Smith, John")]);
    assert_eq!(
        s.count(
            "acme",
            "members",
            "display_name IN ('Smith', 'John', ' John')"
        )
        .await,
        3,
        "the rows either side of the comma survive"
    );
}

/// Attack: `DELETE ?done=is.true&limit=10`, trusting `limit` to bound the damage, when PATCH
/// and DELETE ignored it and changed every matching row. They refuse it now, as they refuse
/// `offset`, `order` and `select`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_on_patch_or_delete_is_refused() {
    let s = Stage::new(&["acme"]).await;
    let tok = token(&s.ns, "acme").await;
    let a = s
        .send(
            Method::POST,
            "/v1/tables/projects",
            &tok,
            Some(r#"{"name": "p"}"#),
        )
        .await;
    let pid = a.json()["id"].as_i64().unwrap();
    let tasks: Vec<Value> = (0..20)
        .map(|i| json!({"project_id": pid, "title": format!("t{i}"), "status": "done"}))
        .collect();
    let a = s
        .send(
            Method::POST,
            "/v1/tables/tasks",
            &tok,
            Some(&Value::Array(tasks).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);

    for (method, query, body, word) in [
        (Method::DELETE, "status=eq.done&limit=10", None, "limit"),
        (Method::DELETE, "limit=0&status=eq.done", None, "limit"),
        (
            Method::PATCH,
            "status=eq.done&limit=1",
            Some(r#"{"title": "x"}"#),
            "limit",
        ),
        (Method::DELETE, "status=eq.done&offset=5", None, "offset"),
        (Method::DELETE, "status=eq.done&order=id", None, "order"),
        (
            Method::PATCH,
            "status=eq.done&select=id",
            Some(r#"{"title": "x"}"#),
            "select",
        ),
    ] {
        let a = s
            .send(
                method.clone(),
                &format!("/v1/tables/tasks?{query}"),
                &tok,
                body,
            )
            .await;
        assert_eq!(
            (a.status, a.problem().as_str()),
            (StatusCode::BAD_REQUEST, "invalid-parameter"),
            "{method} {query}: {}",
            a.text
        );
        let detail = a.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(word), "{method} {query}: {detail}");
    }
    assert_eq!(
        s.count("acme", "tasks", "status = 'done' AND title <> 'x'")
            .await,
        20
    );
    // Without limit, the same filters work as before.
    let a = s
        .send(
            Method::DELETE,
            "/v1/tables/tasks?status=eq.done&title=eq.t3",
            &tok,
            None,
        )
        .await;
    assert_eq!(a.column("title"), [json!("t3")]);
}

impl Stage {
    /// The tenant's token signing key, from its Secret.
    async fn key(&self, tenant: &str) -> Vec<u8> {
        let s = self
            .ns
            .secrets()
            .get(&format!("{tenant}-db"))
            .await
            .unwrap();
        secret_value(&s, "jwt-key").into_bytes()
    }
}

/// A token for `claims` signed HS256 with `key`, with extra header fields (`kid`, `jku`).
fn hs256(claims: &Value, key: &[u8], header: Value) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
    use hmac::{Hmac, Mac};
    let mut h = json!({"alg": "HS256", "typ": "JWT"});
    h.as_object_mut()
        .unwrap()
        .extend(header.as_object().unwrap().clone());
    let signed = format!(
        "{}.{}",
        B64.encode(h.to_string()),
        B64.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// `claims` with `key` removed (`null`) or replaced.
fn with(claims: &Value, key: &str, v: Value) -> Value {
    let mut c = claims.clone();
    let o = c.as_object_mut().unwrap();
    if v.is_null() {
        o.remove(key);
    } else {
        o.insert(key.into(), v);
    }
    c
}

/// Plays each token against acme's rows: every one must get a 401 or 403 problem+json and
/// none of the data.
async fn refused(s: &Stage, cases: Vec<(&str, String, u16)>) {
    for (what, tok, want) in cases {
        for uri in ["/v1/tables/projects", "/v1/tenant"] {
            let a = s
                .send_with(
                    Method::GET,
                    uri,
                    &[
                        ("x-tenant", "acme"),
                        ("authorization", &format!("Bearer {tok}")),
                    ],
                    None,
                )
                .await;
            assert_eq!(a.status.as_u16(), want, "{what} on {uri}: {}", a.text);
            let kind = a.problem();
            assert!(!a.text.contains("crown jewels"), "{what}: {}", a.text);
            if want == 401 {
                assert_eq!(kind, "unauthorized", "{what}");
                assert!(a.headers.contains_key("www-authenticate"), "{what}");
            }
        }
    }
}

/// Puts a row only acme may see into acme's projects.
async fn crown_jewels(s: &Stage) {
    s.pg.execute(
        format!(
            "INSERT INTO \"{}\".projects (name) VALUES ('crown jewels')",
            s.schema("acme")
        )
        .as_str(),
    )
    .await
    .unwrap();
}

/// Attack: with `--jwt-issuer` and `--jwt-audience` set, a token signed with the tenant's key
/// that leaves `iss` or `aud` out, or gives them a type the check skips (`"aud": 123`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_the_configured_issuer_or_audience_are_refused() {
    let s = Stage::with_auth(
        &["acme"],
        AuthConfig {
            issuer: Some("https://id.example.com".into()),
            audience: Some("tenantry".into()),
            leeway_secs: 5,
            platform: None,
        },
    )
    .await;
    crown_jewels(&s).await;
    let key = s.key("acme").await;
    let good = json!({"tenant": "acme", "sub": "u", "exp": crate::api::now() + 300,
                      "iss": "https://id.example.com", "aud": "tenantry"});
    let a = s
        .send(
            Method::GET,
            "/v1/tables/projects",
            &hs256(&good, &key, json!({})),
            None,
        )
        .await;
    assert_eq!(
        a.column("name"),
        [json!("crown jewels")],
        "the complete token works"
    );
    let a = s
        .send(
            Method::GET,
            "/v1/tables/projects",
            &hs256(
                &with(&good, "aud", json!(["other", "tenantry"])),
                &key,
                json!({}),
            ),
            None,
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "an audience list naming us: {}",
        a.text
    );

    let no_iss_aud = with(&with(&good, "iss", Value::Null), "aud", Value::Null);
    let cases = [
        ("no iss", with(&good, "iss", Value::Null)),
        ("no aud", with(&good, "aud", Value::Null)),
        ("neither iss nor aud", no_iss_aud),
        ("aud a number", with(&good, "aud", json!(123))),
        (
            "aud an object",
            with(&good, "aud", json!({"tenantry": true})),
        ),
        ("aud a list of numbers", with(&good, "aud", json!([1, 2]))),
        ("aud an empty list", with(&good, "aud", json!([]))),
        ("aud another audience", with(&good, "aud", json!("other"))),
        ("iss a number", with(&good, "iss", json!(7))),
        (
            "iss a list",
            with(&good, "iss", json!(["https://id.example.com"])),
        ),
        (
            "iss another issuer",
            with(&good, "iss", json!("https://evil.example.com")),
        ),
    ];
    refused(
        &s,
        cases
            .into_iter()
            .map(|(what, c)| (what, hs256(&c, &key, json!({})), 401))
            .collect(),
    )
    .await;
}

/// Attack: tokens signed with the tenant's own key whose time or tenant claims are missing or
/// malformed — no `exp`, `exp` as a string, `nbf` in the future, no or another tenant claim,
/// and an `aud` of the wrong type when no audience is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_missing_or_malformed_claims_are_refused() {
    let s = Stage::new(&["acme", "globex"]).await;
    crown_jewels(&s).await;
    let key = s.key("acme").await;
    let now = crate::api::now();
    let good = json!({"tenant": "acme", "sub": "u", "exp": now + 300});
    let a = s
        .send(
            Method::GET,
            "/v1/tables/projects",
            &hs256(&good, &key, json!({})),
            None,
        )
        .await;
    assert_eq!(
        a.column("name"),
        [json!("crown jewels")],
        "the complete token works"
    );
    let cases = [
        ("no exp", with(&good, "exp", Value::Null), 401),
        (
            "exp a string",
            with(&good, "exp", json!((now + 300).to_string())),
            401,
        ),
        ("exp a list", with(&good, "exp", json!([now + 300])), 401),
        ("exp past", with(&good, "exp", json!(now - 3600)), 401),
        ("exp negative", with(&good, "exp", json!(-1)), 401),
        ("nbf in an hour", with(&good, "nbf", json!(now + 3600)), 401),
        (
            "nbf a string",
            with(&good, "nbf", json!(now.to_string())),
            401,
        ),
        (
            "aud a number, none configured",
            with(&good, "aud", json!(123)),
            401,
        ),
        (
            "aud an object, none configured",
            with(&good, "aud", json!({})),
            401,
        ),
        (
            "iss a number, none configured",
            with(&good, "iss", json!(1)),
            401,
        ),
        ("no tenant claim", with(&good, "tenant", Value::Null), 403),
        (
            "tenant claim a list",
            with(&good, "tenant", json!(["acme"])),
            403,
        ),
        (
            "tenant claim globex",
            with(&good, "tenant", json!("globex")),
            403,
        ),
        ("claims not an object", json!(["acme"]), 401),
    ];
    refused(
        &s,
        cases
            .into_iter()
            .map(|(what, c, want)| (what, hs256(&c, &key, json!({})), want))
            .collect(),
    )
    .await;
}

/// Attack: algorithm and key games — `alg: none`, a token for acme signed with globex's key
/// (with and without a `kid` or `jku` pointing at globex's or an attacker's key), HS512 and
/// RS256 headers over an HMAC signature, and an empty key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithm_and_key_games_are_refused() {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
    let s = Stage::new(&["acme", "globex"]).await;
    crown_jewels(&s).await;
    let (acme, globex) = (s.key("acme").await, s.key("globex").await);
    let claims = json!({"tenant": "acme", "sub": "u", "exp": crate::api::now() + 300});
    let good = hs256(&claims, &acme, json!({}));
    let a = s
        .send(Method::GET, "/v1/tables/projects", &good, None)
        .await;
    assert_eq!(
        a.column("name"),
        [json!("crown jewels")],
        "the real token works"
    );

    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            B64.encode(json!({"alg": alg, "typ": "JWT"}).to_string()),
            B64.encode(claims.to_string())
        )
    };
    let resigned = |header: Value| {
        // The real token's payload and signature under another header.
        let parts: Vec<&str> = good.split('.').collect();
        format!(
            "{}.{}.{}",
            B64.encode(header.to_string()),
            parts[1],
            parts[2]
        )
    };
    let attacker = b"an attacker's key, long enough for HS256".to_vec();
    let cases = vec![
        ("alg none", unsigned("none"), 401),
        ("alg None", unsigned("None"), 401),
        (
            "alg none, real signature",
            format!("{}{}", unsigned("none"), good.split('.').nth(2).unwrap()),
            401,
        ),
        (
            "signed with globex's key",
            hs256(&claims, &globex, json!({})),
            401,
        ),
        (
            "globex's key, kid globex",
            hs256(&claims, &globex, json!({"kid": "globex"})),
            401,
        ),
        (
            "globex's key, kid acme",
            hs256(&claims, &globex, json!({"kid": "acme"})),
            401,
        ),
        (
            "globex's key, kid a path",
            hs256(&claims, &globex, json!({"kid": "../globex-db"})),
            401,
        ),
        (
            "attacker's key, jku",
            hs256(
                &claims,
                &attacker,
                json!({"jku": "https://evil.example.com/jwks"}),
            ),
            401,
        ),
        ("empty key", hs256(&claims, b"", json!({})), 401),
        (
            "HS512 header",
            resigned(json!({"alg": "HS512", "typ": "JWT"})),
            401,
        ),
        (
            "RS256 header",
            resigned(json!({"alg": "RS256", "typ": "JWT"})),
            401,
        ),
        (
            "ES256 header",
            resigned(json!({"alg": "ES256", "typ": "JWT"})),
            401,
        ),
        (
            "no signature",
            good.rsplit_once('.').unwrap().0.to_string(),
            401,
        ),
        (
            "globex's own token",
            hs256(
                &with(&claims, "tenant", json!("globex")),
                &globex,
                json!({}),
            ),
            403,
        ),
    ];
    refused(&s, cases).await;
}

/// A table whose defaults record who inserted a row, with which search_path and whether the
/// transaction was read-only: created by the owner, like a migration, so nothing the tenant
/// wrote runs.
const WHOAMI: &str =
    "CREATE TABLE whoami (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text,
    who text NOT NULL DEFAULT current_user,
    path text NOT NULL DEFAULT current_setting('search_path'))";

impl Stage {
    /// Inserts into the tenant's `whoami` and returns (current_user, search_path) as the
    /// request saw them.
    async fn whoami(&self, tok: &str) -> (String, String) {
        let a = self
            .send(
                Method::POST,
                "/v1/tables/whoami",
                tok,
                Some(r#"{"note": "x"}"#),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        let v = a.json();
        (
            v["who"].as_str().unwrap().to_string(),
            v["path"].as_str().unwrap().replace('"', ""),
        )
    }

    /// Gateway backends in a transaction that nobody is running.
    async fn idle_in_transaction(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(gateway_role(&self.ns))
        .fetch_one(&self.pg)
        .await
        .unwrap()
    }

    /// Waits until no gateway connection sits idle in a transaction.
    /// The gateway's sessions waiting on `on`: a wait event type (`Lock`) or a wait event
    /// (`PgSleep`).
    async fn gateway_waiting(&self, on: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND (wait_event_type = $2 OR wait_event = $2)",
        )
        .bind(gateway_role(&self.ns))
        .bind(on)
        .fetch_one(&self.pg)
        .await
        .unwrap()
    }

    /// The gateway's sessions on the server.
    async fn gateway_sessions(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(gateway_role(&self.ns))
            .fetch_one(&self.pg)
            .await
            .unwrap()
    }

    /// Waits (30 s at most, then fails with `what`) until at least `n` gateway sessions wait
    /// on `on`.
    async fn wait_gateway_waiting(&self, on: &str, n: i64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.gateway_waiting(on).await < n {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn no_idle_transactions(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.idle_in_transaction().await;
            if n == 0 {
                // And every pooled session is back to the gateway between transactions: no
                // tenant role, no tenant search_path left set.
                let gateway = gateway_role(&self.ns);
                for session in self.api.data.inspect_idle().await.unwrap() {
                    assert_eq!(session.current_user, gateway, "{session:?}");
                    assert_eq!(session.search_path, "\"$user\", public", "{session:?}");
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} gateway connections idle in transaction"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Attack: objects in the gateway session's temporary schema shadowing the tenant's or the
/// catalog's (`pg_temp` is searched first unless listed): each request runs as the tenant's
/// app role with `search_path` = its schema, then `pg_temp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_as_the_tenant_with_pg_temp_last() {
    let s = Stage::new(&["acme"]).await;
    s.as_owner("acme", WHOAMI).await;
    let tok = token(&s.ns, "acme").await;
    let schema = s.schema("acme");
    assert_eq!(
        s.whoami(&tok).await,
        (schema.clone(), format!("{schema}, pg_temp"))
    );
    s.no_idle_transactions().await;
}

/// Attack: a request whose transaction fails while it is being opened — here a tenant whose
/// role the gateway may no longer take (its grant revoked, as when a Tenant is deleted with
/// `Retain` while the registry still routes it) — leaving its pooled connection inside an
/// aborted transaction that every later request on it, of any tenant, would inherit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_leaves_no_poisoned_connection_in_the_pool() {
    let s = Stage::new(&["acme", "globex"]).await;
    s.as_owner("globex", WHOAMI).await;
    let (acme, globex) = (token(&s.ns, "acme").await, token(&s.ns, "globex").await);
    assert_eq!(s.whoami(&globex).await.0, s.schema("globex"));
    revoke_role(&s.pg, &s.schema("acme"), &gateway_role(&s.ns)).await;
    let mut refused = Vec::new();
    for _ in 0..5 {
        let a = s
            .send(Method::GET, "/v1/tables/projects", &acme, None)
            .await;
        refused.push((a.status, a.problem()));
    }
    // Another tenant, on the same pool, is served as itself every time.
    for i in 0..10 {
        let a = s
            .send(
                Method::POST,
                "/v1/tables/whoami",
                &globex,
                Some(r#"{"note": "x"}"#),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "globex request {i}: {}",
            a.text
        );
        assert_eq!(a.json()["who"], s.schema("globex"));
    }
    s.no_idle_transactions().await;
    let denied = (StatusCode::FORBIDDEN, "permission-denied".to_string());
    assert_eq!(refused, vec![denied; 5], "acme's own requests");
}

/// Attack: the statement pipelined behind a `SET LOCAL ROLE` that fails. The gateway may no
/// longer take acme's role, but was granted acme's table directly: a statement that ran
/// after the refused role — as the gateway — would read acme's rows. Requests run both with
/// the statement already prepared on their connection (one flight) and without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_role_never_lets_the_statement_run_as_the_gateway() {
    // All 16 requests at once, without 429s: they wait for the pool's 4 connections.
    let s = Stage::sharing(&["acme"], 16, 1000).await;
    let (schema, gateway) = (s.schema("acme"), gateway_role(&s.ns));
    s.as_owner(
        "acme",
        &format!(
            "INSERT INTO projects (name) VALUES ('crown jewel');
             GRANT USAGE ON SCHEMA \"{schema}\" TO \"{gateway}\";
             GRANT SELECT ON projects TO \"{gateway}\""
        ),
    )
    .await;
    let acme = token(&s.ns, "acme").await;
    let uris = ["/v1/tables/projects", "/v1/tables/projects/1"];
    // Prepare both statements on several of the pool's connections.
    let warm =
        futures::future::join_all((0..8).map(|i| s.send(Method::GET, uris[i % 2], &acme, None)))
            .await;
    for a in warm {
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        assert!(a.text.contains("crown jewel"), "{}", a.text);
    }
    revoke_role(&s.pg, &schema, &gateway).await;
    let refused =
        futures::future::join_all((0..16).map(|i| s.send(Method::GET, uris[i % 2], &acme, None)))
            .await;
    for a in refused {
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
        assert!(!a.text.contains("crown jewel"), "{}", a.text);
    }
    s.no_idle_transactions().await;
}

/// Attack: requests abandoned mid-statement (the client hangs up while PostgreSQL waits on a
/// lock). Their writes, still waiting, must be cancelled in PostgreSQL and so not commit,
/// their connections must not come back to the pool
/// inside the transaction, and they must not hold the pool's slots until the statement
/// timeout while other tenants wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_neither_commit_nor_hold_connections() {
    // acme may take the whole pool and wait on the lock until the statement timeout: the
    // connections are freed by the cancellation, not by a 429 or the lock timeout.
    let s = Stage::sharing(&["acme", "globex"], POOL_SIZE, 0).await;
    s.as_owner(
        "acme",
        &format!("{WHOAMI}; INSERT INTO projects (name) VALUES ('p')"),
    )
    .await;
    s.as_owner("globex", WHOAMI).await;
    let (acme, globex) = (token(&s.ns, "acme").await, token(&s.ns, "globex").await);

    let mut locker = s.pg.acquire().await.unwrap();
    locker
        .execute(
            format!(
                "BEGIN; LOCK TABLE \"{}\".projects IN ACCESS EXCLUSIVE MODE",
                s.schema("acme")
            )
            .as_str(),
        )
        .await
        .unwrap();
    let n = POOL_SIZE as i64;
    let patches = futures::future::join_all((0..n).map(|_| {
        s.send(
            Method::PATCH,
            "/v1/tables/projects?name=eq.p",
            &acme,
            Some(r#"{"description": "cancelled"}"#),
        )
    }));
    let all_waiting = async {
        loop {
            if s.gateway_waiting("Lock").await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = patches => panic!("the PATCHes finished while the table was locked"),
        _ = tokio::time::timeout(Duration::from_secs(10), all_waiting) => {}
    }
    // The PATCHes are dropped: another tenant is served at once, as itself.
    let who = tokio::time::timeout(Duration::from_secs(2), s.whoami(&globex))
        .await
        .expect("globex waited for the abandoned requests' connections");
    assert_eq!(who.0, s.schema("globex"));

    locker.execute("ROLLBACK").await.unwrap();
    s.no_idle_transactions().await;
    assert_eq!(s.count("acme", "projects", "description IS NULL").await, 1);
    assert_eq!(s.whoami(&acme).await.0, s.schema("acme"));
    assert_eq!(s.count("acme", "projects", "description IS NULL").await, 1);
}

/// Attack: unauthenticated requests with invented methods (`FOOBAR /v1/tables/x`), each of
/// which used to add a `method` label value to `/metrics`, growing it without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let s = Stage::new(&[]).await;
    for i in 0..50 {
        let m = Method::from_bytes(format!("XMETHOD{i:02}").as_bytes()).unwrap();
        let a = s.send_with(m, "/v1/tables/x", &[], None).await;
        assert!(a.status.is_client_error(), "{}", a.status);
        a.problem();
    }
    let (status, text) = s.api.scrape().await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("XMETHOD"), "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
    // Tenant traffic does not reach the metrics at all: they have a port of their own.
    let a = s.send_with(Method::GET, "/metrics", &[], None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

/// Attack on integrity rather than isolation: a `numeric` with more digits than an f64 holds
/// (or a range it cannot hold), silently rounded when the API parses the JSON body or
/// re-parses PostgreSQL's answer, so that the stored or reported amount is not what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_numerics_keep_every_digit() {
    let s = Stage::new(&["acme"]).await;
    s.as_owner(
        "acme",
        "CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
           amount numeric NOT NULL, note text)",
    )
    .await;
    let tok = token(&s.ns, "acme").await;
    let stored = |id: i64| {
        let s = &s;
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT amount::text FROM \"{}\".ledger WHERE id = $1",
                s.schema("acme")
            ))
            .bind(id)
            .fetch_one(&s.pg)
            .await
            .unwrap()
        }
    };
    const A: &str = "123456789012345678901234567890.123456789";
    const B: &str = "-987654321098765432109876543210.000000001";
    const C: &str = "0.100000000000000000000000000000000000000001";

    let a = s
        .send(
            Method::POST,
            "/v1/tables/ledger",
            &tok,
            Some(&format!(r#"{{"amount": {A}, "note": "single"}}"#)),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert!(a.text.contains(&format!(r#""amount":{A}"#)), "{}", a.text);
    assert!(
        a.text.trim_start().starts_with('{'),
        "one object: {}",
        a.text
    );
    let id = a.json()["id"].as_i64().unwrap();
    assert_eq!(stored(id).await, A);

    let a = s
        .send(Method::GET, &format!("/v1/tables/ledger/{id}"), &tok, None)
        .await;
    assert!(a.text.contains(&format!(r#""amount":{A}"#)), "{}", a.text);
    let a = s
        .send(
            Method::GET,
            &format!("/v1/tables/ledger?amount=eq.{A}"),
            &tok,
            None,
        )
        .await;
    assert!(a.text.contains(&format!(r#""amount":{A}"#)), "{}", a.text);

    let a = s
        .send(
            Method::PATCH,
            &format!("/v1/tables/ledger?id=eq.{id}"),
            &tok,
            Some(&format!(r#"{{"amount": {B}}}"#)),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(a.text.contains(&format!(r#""amount":{B}"#)), "{}", a.text);
    assert_eq!(stored(id).await, B);

    // An array, and numbers outside f64's range: PostgreSQL parses them, not the API.
    let a = s
        .send(
            Method::POST,
            "/v1/tables/ledger",
            &tok,
            Some(&format!(
                r#"[{{"amount": {C}}}, {{"amount": 1e400}}, {{"amount": 2E-400}}]"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert!(a.text.contains(&format!(r#""amount":{C}"#)), "{}", a.text);
    assert!(
        a.text
            .contains(&format!(r#""amount":1{}"#, "0".repeat(400))),
        "{}",
        a.text
    );
    // (The answer is not parsed here: serde_json, like the API before, refuses 1e400.)
    assert_eq!(stored(id + 1).await, C);
    assert_eq!(stored(id + 2).await, format!("1{}", "0".repeat(400)));
    assert_eq!(stored(id + 3).await, format!("0.{}2", "0".repeat(399)));
}

/// Attack on the client's bookkeeping: a bulk POST whose rows carry different sets of keys
/// (so they are inserted in groups) answered in group order, so that a client pairing its
/// rows with the answer's by position attributes ids and defaults to the wrong rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_insert_answers_in_request_order() {
    let s = Stage::new(&["acme"]).await;
    let tok = token(&s.ns, "acme").await;
    let a = s
        .send(
            Method::POST,
            "/v1/tables/projects",
            &tok,
            Some(r#"{"name": "p"}"#),
        )
        .await;
    let pid = a.json()["id"].as_i64().unwrap();
    // 50 rows, titles out of order, three shapes interleaved.
    let rows: Vec<Value> = (0..50)
        .map(|i| {
            let n = (i * 17) % 50;
            let title = format!("t{n:02}");
            match n % 3 {
                0 => json!({"project_id": pid, "title": title}),
                1 => json!({"title": title, "status": "doing", "project_id": pid}),
                _ => json!({"due_date": format!("2030-01-{:02}", n % 28 + 1), "project_id": pid, "title": title}),
            }
        })
        .collect();
    let a = s
        .send(
            Method::POST,
            "/v1/tables/tasks",
            &tok,
            Some(&Value::Array(rows.clone()).to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let got = a.json();
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), rows.len());
    for (sent, back) in rows.iter().zip(got) {
        assert_eq!(back["title"], sent["title"], "{}", a.text);
        let status = sent.get("status").cloned().unwrap_or(json!("todo"));
        assert_eq!(back["status"], status, "{back}");
        assert_eq!(
            back["due_date"],
            sent.get("due_date").cloned().unwrap_or(Value::Null)
        );
    }
    // The ids answered are the rows' own.
    for back in got {
        let a = s
            .send(
                Method::GET,
                &format!("/v1/tables/tasks/{}", back["id"]),
                &tok,
                None,
            )
            .await;
        assert_eq!(a.json()["title"], back["title"]);
    }
}

/// Attack: a tenant locks its own table from a direct session (`LOCK TABLE … ACCESS
/// EXCLUSIVE` in an open transaction) and floods the API with reads of it. Without a lock
/// timeout each read would hold a pool connection for the whole statement timeout, and
/// without a per-tenant share twelve of them would take all four connections: the other
/// tenants would wait in line behind them. Here the flood gets 429s beyond acme's share, the
/// one read that got a connection gives up after the lock timeout (503 `lock-timeout`), and
/// globex is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_locking_its_own_table_cannot_starve_the_others() {
    let s = Stage::new(&["acme", "globex"]).await;
    let (acme, globex) = (token(&s.ns, "acme").await, token(&s.ns, "globex").await);
    // Catalogs read and statements prepared before the lock.
    for t in [&acme, &globex] {
        let a = s.send(Method::GET, "/v1/tables/projects", t, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let mut locker = super::as_tenant(&s.ns, "acme").await;
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute(
            format!(
                "LOCK TABLE \"{}\".projects IN ACCESS EXCLUSIVE MODE",
                s.schema("acme")
            )
            .as_str(),
        )
        .await
        .unwrap();

    let started = Instant::now();
    let flood = futures::future::join_all(
        (0..12).map(|_| s.send(Method::GET, "/v1/tables/projects", &acme, None)),
    );
    let then_globex = async {
        // Once acme's flood is waiting on its lock in PostgreSQL.
        s.wait_gateway_waiting("Lock", 1, "acme's flood never waited on its lock")
            .await;
        let asked = Instant::now();
        let a = s
            .send(Method::GET, "/v1/tables/projects", &globex, None)
            .await;
        (a, asked.elapsed())
    };
    let (answers, (g, g_took)) = tokio::join!(
        async {
            let answers = flood.await;
            (answers, started.elapsed())
        },
        then_globex
    );
    let (answers, flood_took) = answers;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert!(
        g_took < Duration::from_millis(1500),
        "globex waited {g_took:?} behind acme's locked requests"
    );

    let mut kinds = std::collections::BTreeMap::new();
    for a in &answers {
        let kind = a.problem();
        assert!(
            matches!(
                (a.status.as_u16(), kind.as_str()),
                (429, "too-many-requests") | (503, "lock-timeout")
            ),
            "{} {}",
            a.status,
            a.text
        );
        assert_eq!(a.headers["retry-after"], "1", "{}", a.text);
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert!(
        kinds.get("too-many-requests").is_some_and(|n| *n >= 1),
        "{kinds:?}"
    );
    assert!(
        kinds.get("lock-timeout").is_some_and(|n| *n >= 1),
        "{kinds:?}"
    );
    // Bounded by the lock timeout (1 s), not the statement timeout (5 s).
    assert!(
        flood_took < Duration::from_secs(4),
        "acme's flood took {flood_took:?}"
    );

    locker.execute("ROLLBACK").await.unwrap();
    s.no_idle_transactions().await;
    let a = s
        .send(Method::GET, "/v1/tables/projects", &acme, None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

/// `spec.api.maxConcurrency` gives one tenant its own share of the pool, read live from the
/// Tenant: with a share of 1, a tenant whose one request waits on a lock gets 429 for the
/// others at once, while the API-wide share (3 here) would have let three wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_own_share_overrides_the_default() {
    let s = Stage::sharing(&["acme"], 3, 1000).await;
    let acme = token(&s.ns, "acme").await;
    let a = s
        .send(Method::GET, "/v1/tables/projects", &acme, None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let mut locker = super::as_tenant(&s.ns, "acme").await;
    let lock = format!(
        "LOCK TABLE \"{}\".projects IN ACCESS EXCLUSIVE MODE",
        s.schema("acme")
    );

    let flood = |n: usize| {
        futures::future::join_all(
            (0..n).map(|_| s.send(Method::GET, "/v1/tables/projects", &acme, None)),
        )
    };
    let kinds = |answers: Vec<Answer>| {
        let mut kinds = std::collections::BTreeMap::new();
        for a in &answers {
            *kinds.entry(a.problem()).or_insert(0) += 1;
        }
        kinds
    };

    // The API-wide share: three requests wait on the lock, the fourth is refused.
    locker.execute("BEGIN").await.unwrap();
    locker.execute(lock.as_str()).await.unwrap();
    let k = kinds(flood(4).await);
    assert_eq!(k.get("lock-timeout"), Some(&3), "{k:?}");
    assert_eq!(k.get("too-many-requests"), Some(&1), "{k:?}");
    locker.execute("ROLLBACK").await.unwrap();

    // The tenant's own share of 1, once the API has seen it.
    s.ns.tenants()
        .patch(
            "acme",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"api": {"maxConcurrency": 1}}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        s.api.registry.by_name("acme"),
        tenantry::registry::Lookup::Found(e) if e.info.max_concurrency == Some(1)
    ) {
        assert!(Instant::now() < deadline, "the API never saw the share");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    locker.execute("BEGIN").await.unwrap();
    locker.execute(lock.as_str()).await.unwrap();
    let answers = flood(4).await;
    let refused = answers
        .iter()
        .find(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .map(|a| a.json()["detail"].clone());
    let k = kinds(answers);
    assert_eq!(k.get("lock-timeout"), Some(&1), "{k:?}");
    assert_eq!(k.get("too-many-requests"), Some(&3), "{k:?}");
    assert!(
        refused.is_some_and(|d| d.as_str().unwrap().contains("1 requests in flight")),
        "the refusal names the tenant's share"
    );
    locker.execute("ROLLBACK").await.unwrap();
    s.no_idle_transactions().await;
}

/// A tenant whose every request runs for seconds (a slow view, a heavy query) holds at most
/// its share of the pool: with three of four connections busy sleeping for it, another
/// tenant is served at once, and the slow tenant's requests beyond its share get 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_running_slow_queries_leaves_the_others_served() {
    let s = Stage::sharing(&["acme", "globex"], 3, 1000).await;
    s.as_owner(
        "acme",
        "CREATE VIEW slow AS SELECT 1 AS id, pg_catalog.pg_sleep(3)::text AS slept",
    )
    .await;
    let (acme, globex) = (token(&s.ns, "acme").await, token(&s.ns, "globex").await);
    // Catalogs read before the flood.
    for t in [&acme, &globex] {
        let a = s.send(Method::GET, "/v1/tables/projects", t, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let flood = futures::future::join_all(
        (0..6).map(|_| s.send(Method::GET, "/v1/tables/slow", &acme, None)),
    );
    let then_globex = async {
        s.wait_gateway_waiting("PgSleep", 3, "acme's three slow requests never ran at once")
            .await;
        let asked = Instant::now();
        let a = s
            .send(Method::GET, "/v1/tables/projects", &globex, None)
            .await;
        (a, asked.elapsed())
    };
    let (answers, (g, took)) = tokio::join!(flood, then_globex);
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert!(
        took < Duration::from_millis(1000),
        "globex waited {took:?} behind acme's slow requests"
    );
    let served = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let refused = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (served, refused),
        (3, 3),
        "acme: its share served, the rest refused"
    );
    s.no_idle_transactions().await;
}

/// Attack: a stream of requests that fail after their statement was prepared (a unique
/// violation fails at execution, after Parse) would, if each failure forgot a statement the
/// server still holds, grow every gateway backend without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_requests_leave_no_prepared_statements_behind() {
    let s = Stage::new(&["acme"]).await;
    let acme = token(&s.ns, "acme").await;
    let body = r#"{"name": "taken"}"#;
    let a = s
        .send(Method::POST, "/v1/tables/projects", &acme, Some(body))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    for _ in 0..30 {
        let a = s
            .send(Method::POST, "/v1/tables/projects", &acme, Some(body))
            .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text);
    }
    let sessions = s.api.data.inspect_idle().await.unwrap();
    assert!(!sessions.is_empty());
    for session in &sessions {
        // The settings statement, on the connection that read it the catalog's, and the
        // INSERT the first (successful) request prepared: 30 failures of it add none.
        assert!(session.prepared <= 3, "{sessions:?}");
    }
    s.no_idle_transactions().await;
}

/// Attack: requests abandoned mid-statement (the client hangs up) would leave their
/// statements running in PostgreSQL after the API freed their connections: a tenant firing
/// and aborting slow requests would hold ever more backends. The API cancels them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_cancelled_in_postgresql() {
    let s = Stage::sharing(&["acme"], 3, 1000).await;
    s.as_owner(
        "acme",
        "CREATE VIEW slow AS SELECT 1 AS id, pg_catalog.pg_sleep(4)::text AS slept",
    )
    .await;
    let acme = token(&s.ns, "acme").await;
    let a = s
        .send(Method::GET, "/v1/tables/projects", &acme, None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let sleeping = || s.gateway_waiting("PgSleep");
    // Three slow requests, abandoned once PostgreSQL runs them.
    let abandoned = futures::future::join_all(
        (0..3).map(|_| s.send(Method::GET, "/v1/tables/slow", &acme, None)),
    );
    let watch = async {
        while sleeping().await < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = abandoned => panic!("the slow requests answered before they were abandoned"),
        _ = watch => {}
    }
    let dropped = Instant::now();
    while sleeping().await > 0 {
        assert!(
            dropped.elapsed() < Duration::from_millis(1500),
            "abandoned statements still running in PostgreSQL after {:?}",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.no_idle_transactions().await;
}

/// A write whose commit fails — a deferred unique constraint, checked at the `Sync` that ends
/// the request's one flight — is refused with 409 problem+json, commits nothing, and leaves
/// its connection clean for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_at_commit_is_refused_and_leaves_the_connection_clean() {
    let s = Stage::new(&["acme"]).await;
    s.as_owner(
        "acme",
        "CREATE TABLE codes_once (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            code text NOT NULL, CONSTRAINT code_once UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await;
    let acme = token(&s.ns, "acme").await;
    let body = Some(r#"{"code": "a"}"#);
    let a = s
        .send(Method::POST, "/v1/tables/codes_once", &acme, body)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let opened = s.api.data.opened();
    for _ in 0..3 {
        let a = s
            .send(Method::POST, "/v1/tables/codes_once", &acme, body)
            .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text);
        assert_eq!(a.problem(), "unique-violation");
    }
    assert_eq!(s.count("acme", "codes_once", "true").await, 1);
    s.no_idle_transactions().await;
    // The connections that answered were kept, not replaced.
    assert_eq!(s.api.data.opened(), opened);
    assert!(!s.api.data.inspect_idle().await.unwrap().is_empty());
    let a = s
        .send(Method::GET, "/v1/tables/codes_once", &acme, None)
        .await;
    assert_eq!(a.column("code"), [json!("a")]);
}

/// The pool's groups: with two groups of four connections, each tenant's statements are
/// prepared on its home group's connections while it has room (each backend learns half of
/// the tenants, not all); a tenant with several requests in flight spreads them over the pool rather than
/// fill its home group; a full home group delays a tenant by the home wait at most (then it
/// takes the first connection any group frees); and the pool's size and acquire timeout
/// hold across groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keep_to_their_home_group_and_a_held_group_costs_only_the_home_wait() {
    const HOME_WAIT: Duration = Duration::from_millis(1500);
    let ns = TestNs::new().await;
    // Five tenants of group 0, three of group 1.
    let mut by_group: [Vec<String>; 2] = Default::default();
    for i in 0.. {
        let name = format!("t{i}");
        let g = home(&ns.schema(&name), 2);
        if by_group[g].len() < [5, 3][g] {
            by_group[g].push(name);
        }
        if by_group[0].len() == 5 && by_group[1].len() == 3 {
            break;
        }
    }
    let names: Vec<&str> = by_group.iter().flatten().map(String::as_str).collect();
    let pool = PoolConfig {
        size: 8,
        acquire_timeout: Duration::from_secs(3),
        home_wait: HOME_WAIT,
        ..test_pool()
    };
    let limits = Limits {
        tenant_max_concurrency: 4,
        ..test_limits()
    };
    let auth = AuthConfig {
        leeway_secs: 5,
        ..AuthConfig::default()
    };
    let s = Stage::in_ns(ns, &names, auth, limits, pool).await;
    assert_eq!(s.api.data.groups(), 2);
    let (slow, mate) = (&by_group[0][..4], by_group[0][4].as_str());
    for t in slow {
        s.as_owner(
            t,
            "CREATE VIEW slow AS SELECT 1 AS id, pg_catalog.pg_sleep(4)::text AS slept;
             CREATE VIEW brief AS SELECT 1 AS id, pg_catalog.pg_sleep(2)::text AS slept",
        )
        .await;
    }
    let mut tokens = std::collections::HashMap::new();
    for n in &names {
        tokens.insert(*n, token(&s.ns, n).await);
    }

    // Requests one at a time (a pool with room everywhere): each on its home group.
    for _ in 0..5 {
        for n in &names {
            let a = s
                .send(Method::GET, "/v1/tables/projects", &tokens[n], None)
                .await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
    }
    let idle = s.api.data.inspect_idle().await.unwrap();
    let mut seen = [0, 0];
    for session in &idle {
        for text in &session.statements {
            for (g, tenants) in by_group.iter().enumerate() {
                for n in tenants {
                    if text.contains(&format!("\"{}\".", s.schema(n))) {
                        assert_eq!(
                            session.group, g,
                            "{n} (group {g}) prepared on a connection of group {}: {text}",
                            session.group
                        );
                        seen[g] += 1;
                    }
                }
            }
        }
    }
    assert!(seen.iter().all(|&n| n > 0), "{seen:?} {idle:?}");

    let timed_mate = || async {
        let asked = Instant::now();
        let a = s
            .send(Method::GET, "/v1/tables/projects", &tokens[mate], None)
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        asked.elapsed()
    };

    // One tenant, four slow requests at once: the first takes its home group (0), the
    // others the group with the most free connections, so both groups prepare its statement
    // and the mate finds its home group free.
    let one = slow[0].as_str();
    let flood = futures::future::join_all(
        (0..4).map(|_| s.send(Method::GET, "/v1/tables/slow", &tokens[one], None)),
    );
    let then_mate = async {
        s.wait_gateway_waiting("PgSleep", 4, "the four slow requests never ran at once")
            .await;
        timed_mate().await
    };
    let (answers, took) = tokio::join!(flood, then_mate);
    assert!(
        took < HOME_WAIT,
        "the group-mate took {took:?}: the busy tenant filled its home group"
    );
    for a in answers {
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let spread: Vec<usize> = s
        .api
        .data
        .inspect_idle()
        .await
        .unwrap()
        .iter()
        .filter(|i| {
            i.statements
                .iter()
                .any(|t| t.contains(&format!("\"{}\".\"slow\"", s.schema(one))))
        })
        .map(|i| i.group)
        .collect();
    assert!(
        spread.contains(&0) && spread.contains(&1),
        "the busy tenant's statement was prepared in groups {spread:?}"
    );

    // Group 0 held by four tenants' slow requests, group 1 by three more (one free
    // connection, less than a group must have spare to be borrowed from at once): the mate
    // waits the home wait, then takes group 1's free connection.
    let sleeping = |n: i64| s.wait_gateway_waiting("PgSleep", n, "the slow requests never ran");
    let firsts = futures::future::join_all(
        slow.iter()
            .map(|t| s.send(Method::GET, "/v1/tables/slow", &tokens[t.as_str()], None)),
    );
    let seconds = async {
        sleeping(4).await;
        futures::future::join_all(
            slow[..3]
                .iter()
                .map(|t| s.send(Method::GET, "/v1/tables/slow", &tokens[t.as_str()], None)),
        )
        .await
    };
    let then_mate = async {
        sleeping(7).await;
        timed_mate().await
    };
    let (firsts, seconds, took) = tokio::join!(firsts, seconds, then_mate);
    assert!(
        took >= HOME_WAIT && took < HOME_WAIT + Duration::from_millis(2000),
        "the group-mate took {took:?} (home wait {HOME_WAIT:?}, slow statements 4 s)"
    );
    for a in firsts.iter().chain(&seconds) {
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }

    // Every connection of both groups taken (the four tenants' second requests spread to
    // group 1): the mate gets the first connection either group frees (the 2 s statements
    // end before its acquire timeout of 3 s), or 503 at the acquire timeout (4 s ones).
    for (view, served) in [("brief", true), ("slow", false)] {
        let uri = format!("/v1/tables/{view}");
        let flood =
            futures::future::join_all(slow.iter().flat_map(|t| {
                [0, 1].map(|_| s.send(Method::GET, &uri, &tokens[t.as_str()], None))
            }));
        let then_mate = async {
            s.wait_gateway_waiting("PgSleep", 8, "the eight slow requests never ran at once")
                .await;
            let asked = Instant::now();
            let a = s
                .send(Method::GET, "/v1/tables/projects", &tokens[mate], None)
                .await;
            (a, asked.elapsed(), s.gateway_sessions().await)
        };
        let (answers, (m, took, sessions)) = tokio::join!(flood, then_mate);
        assert!(sessions <= 8, "{sessions} gateway sessions on a pool of 8");
        if served {
            assert_eq!(m.status, StatusCode::OK, "{}", m.text);
            assert!(
                took < Duration::from_secs(3),
                "the mate took {took:?} (statements 2 s, acquire timeout 3 s)"
            );
        } else {
            assert_eq!(m.status, StatusCode::SERVICE_UNAVAILABLE, "{}", m.text);
            assert_eq!(m.problem(), "pool-exhausted");
            assert!(
                took >= Duration::from_secs(3) && took < Duration::from_millis(3900),
                "refused after {took:?} (acquire timeout 3 s)"
            );
        }
        for a in answers {
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        }
    }
    s.no_idle_transactions().await;
    let idle = s.api.data.inspect_idle().await.unwrap();
    for g in 0..2 {
        let n = idle.iter().filter(|i| i.group == g).count();
        assert!(n <= 4, "{n} connections in group {g}: {idle:?}");
    }
}
