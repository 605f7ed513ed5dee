//! The API's one error type: RFC 9457 problem+json bodies with stable `type`s. Internal
//! details go to the log, never to the client.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{query::QueryError, wire::WireError};

/// Base of every problem `type` URI.
pub const PROBLEM_BASE: &str = "https://tenantry.dev/problems/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable kind, the last segment of the problem `type`.
    pub kind: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// Adds `WWW-Authenticate: Bearer` (401 responses).
    pub challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
        }
    }

    pub fn bad_request(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, detail)
    }

    pub fn unauthorized(detail: impl Into<String>, error: &'static str) -> Self {
        Self {
            challenge: Some(error),
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
        }
    }

    pub fn forbidden(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, kind, detail)
    }

    pub fn not_found(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, kind, detail)
    }

    pub fn unavailable(kind: &'static str, detail: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail)
        }
    }

    /// The tenant is suspended (`spec.suspended`): 423, type `tenant-suspended`.
    pub fn suspended(tenant: &str) -> Self {
        Self::new(
            StatusCode::LOCKED,
            "tenant-suspended",
            format!("tenant {tenant:?} is suspended"),
        )
    }

    /// The tenant's storage is above its quota (`spec.limits.storage`): 403, type
    /// `quota-exceeded`. A 4xx, not 507: the refusal is a policy about this tenant's data that
    /// holds until the tenant deletes some, not a fault of the server that a retry could
    /// outlast, and clients and proxies must neither retry it nor count it against the
    /// service's availability.
    pub fn quota_exceeded(tenant: &str) -> Self {
        Self::forbidden(
            "quota-exceeded",
            format!(
                "tenant {tenant:?} is above its storage quota: writes are refused until usage falls below 90 % of it; reads and DELETE work"
            ),
        )
    }

    /// The tenant has as many requests in flight as it may (429, `Retry-After`).
    pub fn too_many_requests(detail: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", detail)
        }
    }

    /// A real fault: logged in full, reported without details.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle the request; the incident is logged",
        )
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("{PROBLEM_BASE}{}", self.kind),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut res = (self.status, body.to_string()).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(error) = self.challenge {
            let v = format!("Bearer realm=\"tenantry\", error=\"{error}\"");
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&v).expect("ascii"),
            );
        }
        res
    }
}

/// A request that cannot become a statement: 404 when it names a table that does not exist,
/// 422 for a null in a NOT NULL column, 400 otherwise, with the query error's kind and detail.
impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let status = match e {
            _ if e.is_not_found() => StatusCode::NOT_FOUND,
            QueryError::NotNull(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.kind(), e.detail())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut => ApiError::unavailable(
                "pool-exhausted",
                "all database connections are busy; retry shortly",
                1,
            ),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                database(&code, db.message(), db.constraint(), &e)
            }
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable(
                    "database-unavailable",
                    "the database is unavailable; retry shortly",
                    2,
                )
            }
            _ => ApiError::internal(e),
        }
    }
}

/// Whatever PostgreSQL refused, with its SQLSTATE: constraint violations as 409/422, the
/// tenant role's missing rights as 403, unavailability as 503, the rest as 500.
fn database(
    code: &str,
    message: &str,
    constraint: Option<&str>,
    e: &dyn std::fmt::Display,
) -> ApiError {
    let msg = message.to_string();
    let detail = match constraint {
        Some(c) => format!("{msg} (constraint {c})"),
        None => msg,
    };
    match code {
        "23505" => ApiError::new(StatusCode::CONFLICT, "unique-violation", detail),
        "23503" => ApiError::new(StatusCode::CONFLICT, "foreign-key-violation", detail),
        "23502" => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-null-violation",
            detail,
        ),
        "23514" => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "check-violation", detail),
        "23P01" => ApiError::new(StatusCode::CONFLICT, "exclusion-violation", detail),
        "428C9" => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "generated-column", detail),
        "42501" => ApiError::forbidden("permission-denied", detail),
        "57014" => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "statement-timeout",
            "the query took too long",
        ),
        "25006" => ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "read-only", detail),
        // lock_timeout: a lock held elsewhere (typically the tenant's own session) outlasted
        // the API's lock timeout. Nothing ran; the request may be retried.
        "55P03" => ApiError::unavailable(
            "lock-timeout",
            "the data is locked by another session; retry shortly",
            1,
        ),
        c if c.starts_with("22") => ApiError::bad_request("invalid-value", detail),
        // An operator or function that the column's type lacks (ordering json, IS TRUE on a
        // number): the request asked for it, nothing ran.
        "42883" | "42804" => ApiError::bad_request("unsupported-operation", detail),
        // Program limits (a body nested too deeply for PostgreSQL's parser, too many
        // parameters): the request is too complex, nothing ran.
        c if c.starts_with("54") => ApiError::bad_request("too-complex", detail),
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::unavailable(
                "database-unavailable",
                "the database is unavailable; retry shortly",
                2,
            )
        }
        _ => ApiError::internal(e),
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        match &e {
            WireError::Db(db) => database(&db.code, &db.message, db.constraint.as_deref(), &e),
            WireError::Io(_) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable(
                    "database-unavailable",
                    "the database is unavailable; retry shortly",
                    2,
                )
            }
            WireError::Protocol(_) => ApiError::internal(e),
            WireError::TooLarge(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "response-too-large",
                format!("{e}: ask for fewer rows (limit) or columns (select)"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_problem_json_with_headers() {
        let res = ApiError::unauthorized("token expired", "invalid_token").into_response();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(res.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "https://tenantry.dev/problems/unauthorized");
        assert_eq!(v["status"], 401);
        let res = ApiError::unavailable("tenant-not-ready", "x", 5).into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "5");
    }

    #[tokio::test]
    async fn a_suspended_tenant_is_a_stable_423() {
        let res = ApiError::suspended("acme").into_response();
        assert_eq!(res.status(), StatusCode::LOCKED);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "https://tenantry.dev/problems/tenant-suspended");
        assert_eq!(v["status"], 423);
    }

    #[tokio::test]
    async fn an_exceeded_quota_is_a_stable_403() {
        let res = ApiError::quota_exceeded("acme").into_response();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "https://tenantry.dev/problems/quota-exceeded");
        assert!(v["detail"].as_str().unwrap().contains("90 %"));
    }

    #[test]
    fn query_errors_keep_their_kind_and_status() {
        let e = ApiError::from(QueryError::UnknownTable("no table named \"x\"".into()));
        assert_eq!(
            (e.status, e.kind, e.detail.as_str()),
            (
                StatusCode::NOT_FOUND,
                "unknown-table",
                "no table named \"x\""
            )
        );
        for (q, kind) in [
            (QueryError::UnknownColumn("c".into()), "unknown-column"),
            (QueryError::NoPrimaryKey("c".into()), "no-primary-key"),
            (QueryError::InvalidFilter("c".into()), "invalid-filter"),
            (QueryError::InvalidOrder("c".into()), "invalid-order"),
            (
                QueryError::InvalidParameter("c".into()),
                "invalid-parameter",
            ),
            (QueryError::InvalidBody("c".into()), "invalid-body"),
        ] {
            let e = ApiError::from(q);
            assert_eq!((e.status, e.kind), (StatusCode::BAD_REQUEST, kind));
        }
    }

    #[test]
    fn lock_timeout_is_503_with_retry_after() {
        let e = database(
            "55P03",
            "canceling statement due to lock timeout",
            None,
            &"x",
        );
        assert_eq!(
            (e.status, e.kind, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, "lock-timeout", Some(1))
        );
        let e = ApiError::too_many_requests("x", 1);
        assert_eq!(
            (e.status, e.kind, e.retry_after),
            (StatusCode::TOO_MANY_REQUESTS, "too-many-requests", Some(1))
        );
    }

    #[test]
    fn pool_exhaustion_is_503() {
        assert_eq!(
            ApiError::from(sqlx::Error::PoolTimedOut).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
