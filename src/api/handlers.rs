//! The `/v1` handlers: the resolved tenant, its catalog, and rows of its tables. Each runs its
//! statement in the tenant's transaction ([`in_tenant`]) against the cached catalog.

use axum::{
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::{
    config::Limits,
    error::ApiError,
    query,
    state::AppState,
    tenant::TenantRequest,
    tx::{in_tenant, json_text},
};

/// Header that allows PATCH or DELETE without filters (every row of the table).
pub const ALL_ROWS_HEADER: &str = "x-tenantry-all-rows";

fn json_response(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// The query string as `application/x-www-form-urlencoded` pairs (`+` is a space). Invalid
/// UTF-8 is refused rather than replaced, so a filter never silently matches on U+FFFD.
fn params(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    let raw = raw.unwrap_or_default();
    // `form_urlencoded` decodes lossily. Pairs are split at ASCII `&` and `=`, which can never
    // sit inside a multi-byte sequence, so the whole string decodes as UTF-8 exactly when
    // every name and value does.
    if percent_encoding::percent_decode_str(&raw)
        .decode_utf8()
        .is_err()
    {
        return Err(ApiError::bad_request(
            "invalid-parameter",
            "query string is not valid UTF-8",
        ));
    }
    Ok(form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect())
}

pub(super) async fn get_tenant(t: TenantRequest) -> Response {
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

pub(super) async fn list_tables(
    State(state): State<AppState>,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let (_slot, c) = slot_and_catalog(&state, &t).await?;
    Ok(Json(json!({ "tables": c.tables.values().collect::<Vec<_>>() })).into_response())
}

/// The tenant's own OpenAPI document: one path per table of its schema, typed rows.
pub(super) async fn openapi(
    State(state): State<AppState>,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let (_slot, c) = slot_and_catalog(&state, &t).await?;
    let doc = super::openapi::tenant_document(&t.entry.info.name, &c, &limits_of(&state, &t));
    Ok(Json(doc).into_response())
}

/// The limits of the request's tenant: the API's, with the tenant's own statement timeout.
fn limits_of(state: &AppState, t: &TenantRequest) -> Limits {
    state
        .settings
        .limits
        .for_tenant(t.entry.info.statement_timeout_ms)
}

/// One of the tenant's slots (its fair share of the pool, or 429) and its schema's catalog.
async fn slot_and_catalog(
    state: &AppState,
    t: &TenantRequest,
) -> Result<(super::share::Slot, std::sync::Arc<query::Catalog>), ApiError> {
    let slot = state
        .slots
        .acquire(t.schema.as_str(), t.entry.info.max_concurrency)
        .await?;
    let c = state
        .catalogs
        .get(
            &t.pool,
            &t.schema,
            t.entry.info.migration_version,
            &limits_of(state, t),
            slot.crowded(),
        )
        .await?;
    Ok((slot, c))
}

/// What a request does to a table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// In a read-only transaction.
    Read,
    /// INSERT or UPDATE: refused while the tenant is over its storage quota.
    Write,
    /// DELETE: allowed over quota (it is how a tenant gets back under it).
    Delete,
}

/// Runs the statement `build` makes for `table` (looked up in the tenant's catalog) in the
/// tenant's transaction, and returns its JSON text. The request holds one of its tenant's
/// slots (its fair share of the pool) throughout, or is refused with 429. A write of a tenant
/// over its storage quota is refused before anything runs, and one that PostgreSQL refuses
/// for want of INSERT or UPDATE while the tenant has a quota (the operator took them away a
/// moment before the API learned of it) gets the same answer.
async fn on_table<F>(
    state: &AppState,
    t: TenantRequest,
    table: String,
    access: Access,
    build: F,
) -> Result<String, ApiError>
where
    F: FnOnce(&str, &query::Table, &Limits) -> Result<query::Sql, ApiError>,
{
    let info = &t.entry.info;
    if access == Access::Write && info.over_quota {
        return Err(ApiError::quota_exceeded(&info.name));
    }
    let limits = limits_of(state, &t);
    let (slot, c) = slot_and_catalog(state, &t).await?;
    let sql = build(t.schema.as_str(), c.table(&table)?, &limits)?;
    let read_only = access == Access::Read;
    let crowded = slot.crowded();
    match in_tenant(&t.pool, &t.schema, read_only, &limits, &sql, crowded).await {
        Err(e) if access == Access::Write && info.has_quota && e.kind == "permission-denied" => {
            Err(ApiError::quota_exceeded(&info.name))
        }
        rows => json_text(rows?),
    }
}

pub(super) async fn list_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let body = on_table(
        &state,
        t,
        table,
        Access::Read,
        move |schema, tbl, limits| Ok(query::select(schema, tbl, &query::parse(&p, tbl, limits)?)?),
    )
    .await?;
    Ok(json_response(StatusCode::OK, body))
}

pub(super) async fn get_row(
    State(state): State<AppState>,
    Path((table, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let body = on_table(
        &state,
        t,
        table,
        Access::Read,
        move |schema, tbl, limits| {
            let q = query::parse(&p, tbl, limits)?;
            if !q.filters.is_empty() || !q.order.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid-parameter",
                    "only select= applies to a single row",
                ));
            }
            Ok(query::by_id(schema, tbl, &id, q.select.as_ref())?)
        },
    )
    .await?;
    if body == "null" {
        return Err(ApiError::not_found(
            "row-not-found",
            "no row with that primary key",
        ));
    }
    Ok(json_response(StatusCode::OK, body))
}

/// The body is bound as sent and the answer is PostgreSQL's JSON text as it produced it:
/// neither passes through a Rust number, so no digit of a `numeric` is lost either way.
pub(super) async fn insert_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    t: TenantRequest,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = query::JsonBody::parse(&body)?;
    let out = on_table(&state, t, table, Access::Write, move |schema, tbl, _| {
        Ok(query::insert(schema, tbl, &body)?)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, out))
}

/// PATCH and DELETE take column filters only. They change every row the filters match:
/// `limit`, `offset` and `order` can neither bound nor pick those rows (a DELETE with
/// `limit=10` would still delete every match), and `select` does not shape their answer.
fn check_mass_change(
    headers: &HeaderMap,
    q: &query::Query,
    method: &Method,
) -> Result<(), ApiError> {
    let refused: Vec<&str> = [
        (q.select.is_some(), "select"),
        (!q.order.is_empty(), "order"),
        (q.limit_given, "limit"),
        (q.offset != 0, "offset"),
    ]
    .into_iter()
    .filter_map(|(given, name)| given.then_some(name))
    .collect();
    if !refused.is_empty() {
        return Err(ApiError::bad_request(
            "invalid-parameter",
            format!(
                "{method} takes only column filters, not {}: it changes every row the filters match, which limit, offset and order cannot bound or pick (narrow the filters instead), and answers with whole rows",
                refused.join(", ")
            ),
        ));
    }
    let confirmed = match headers.get(ALL_ROWS_HEADER) {
        None => false,
        Some(v) if v == "true" => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid-parameter",
                format!("{ALL_ROWS_HEADER} takes only the value true"),
            ))
        }
    };
    if q.filters.is_empty() && !confirmed {
        return Err(ApiError::bad_request(
            "unfiltered-change",
            format!("{method} without filters would change every row; add filters or send {ALL_ROWS_HEADER}: true"),
        ));
    }
    Ok(())
}

pub(super) async fn update_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    t: TenantRequest,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let patch = query::JsonBody::parse(&body)?;
    if !matches!(patch.shape(), query::Shape::Object(_)) {
        return Err(ApiError::bad_request(
            "invalid-body",
            "PATCH takes one JSON object",
        ));
    }
    let out = on_table(
        &state,
        t,
        table,
        Access::Write,
        move |schema, tbl, limits| {
            let q = query::parse(&p, tbl, limits)?;
            check_mass_change(&headers, &q, &Method::PATCH)?;
            Ok(query::update(schema, tbl, &q.filters, &patch)?)
        },
    )
    .await?;
    Ok(json_response(StatusCode::OK, out))
}

pub(super) async fn delete_rows(
    State(state): State<AppState>,
    Path(table): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    t: TenantRequest,
) -> Result<Response, ApiError> {
    let p = params(raw)?;
    let out = on_table(
        &state,
        t,
        table,
        Access::Delete,
        move |schema, tbl, limits| {
            let q = query::parse(&p, tbl, limits)?;
            check_mass_change(&headers, &q, &Method::DELETE)?;
            Ok(query::delete(schema, tbl, &q.filters)?)
        },
    )
    .await?;
    Ok(json_response(StatusCode::OK, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(raw: &str) -> Vec<(String, String)> {
        params(Some(raw.to_string())).unwrap()
    }

    #[test]
    fn decodes_query_strings_like_forms() {
        let owned = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(params(None).unwrap(), vec![]);
        assert_eq!(
            pairs("title=eq.a+b&&id=in.(1%2C2)&flag&=x&note=1%2B1"),
            owned(&[
                ("title", "eq.a b"),
                ("id", "in.(1,2)"),
                ("flag", ""),
                ("", "x"),
                ("note", "1+1")
            ])
        );
        assert_eq!(pairs("t=eq.%C3%A9"), owned(&[("t", "eq.é")]));
        assert_eq!(pairs("a=b=c"), owned(&[("a", "b=c")]));
        assert_eq!(pairs("a=%zz%"), owned(&[("a", "%zz%")]));
    }

    #[test]
    fn patch_and_delete_take_only_filters() {
        let t = query::Table {
            name: "t".into(),
            columns: vec![query::Column {
                name: "done".into(),
                type_sql: "boolean".into(),
                cast_sql: "boolean".into(),
                nullable: false,
                has_default: false,
                read_only: false,
            }],
            primary_key: None,
        };
        let check = |raw: &str| {
            let q = query::parse(&pairs(raw), &t, &Limits::default()).unwrap();
            check_mass_change(&HeaderMap::new(), &q, &Method::DELETE)
        };
        assert!(check("done=is.true").is_ok());
        for (raw, named) in [
            ("done=is.true&limit=10", "limit"),
            ("done=is.true&limit=100", "limit"),
            ("limit=0&done=is.true", "limit"),
            ("done=is.true&offset=1", "offset"),
            ("done=is.true&order=done", "order"),
            ("done=is.true&select=done", "select"),
        ] {
            let e = check(raw).unwrap_err();
            assert_eq!(
                (e.status, e.kind),
                (StatusCode::BAD_REQUEST, "invalid-parameter"),
                "{raw}"
            );
            assert!(e.detail.contains(&format!("not {named}:")), "{}", e.detail);
        }
        let e = check("limit=1&done=is.true&order=done").unwrap_err();
        assert!(e.detail.contains("not order, limit:"), "{}", e.detail);
        // An unfiltered change still needs the header, limit or not.
        let q = query::parse(&[], &t, &Limits::default()).unwrap();
        assert_eq!(
            check_mass_change(&HeaderMap::new(), &q, &Method::PATCH)
                .unwrap_err()
                .kind,
            "unfiltered-change"
        );
    }

    #[test]
    fn refuses_invalid_utf8() {
        for raw in ["t=eq.%FF", "%C3=x", "a=%C3&b=%A9", "a=%E2%82"] {
            let e = params(Some(raw.to_string())).unwrap_err();
            assert_eq!(
                (e.status, e.kind),
                (StatusCode::BAD_REQUEST, "invalid-parameter"),
                "{raw}"
            );
        }
    }
}
