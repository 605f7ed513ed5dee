//! The OpenAPI 3.1 descriptions of the API: the generic one at `/openapi.json` (any table,
//! untyped rows), and each tenant's own at `/v1/openapi.json` ([`tenant_document`]), with one
//! path per table of its schema and rows, filters and bodies typed from the column types.

use serde_json::{json, Map, Value};

use super::{
    config::Limits,
    query::{Catalog, Column, Table},
};

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

fn rows(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}})
}

/// The 403 of a write: the tenant's storage is above its quota, besides the common reasons.
const QUOTA_403: &str = "Token for another tenant, or request sources disagree; or the tenant's storage is above its quota (quota-exceeded: writes are refused until usage falls below 90 % of the quota; reads and DELETE work)";

/// The document.
pub fn document() -> Value {
    let table = json!({"name": "table", "in": "path", "required": true, "schema": {"type": "string"}, "description": "Table name, exactly as in the tenant schema"});
    let filters = json!({"name": "filters", "in": "query", "style": "form", "explode": true,
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "description": "Column filters `<column>=<op>.<value>` with op one of eq, neq, lt, lte, gt, gte, like, ilike (`*` is a wildcard), in.(a,b), is.null, is.notnull, is.true, is.false"});
    let common = json!({
        "400": problem("Bad filter, parameter or body"),
        "401": problem("Missing or invalid token (with WWW-Authenticate)"),
        "403": problem("Token for another tenant, or request sources disagree"),
        "404": problem("Unknown tenant, table or row"),
        "421": problem("Tenant name or host claimed by several Tenants"),
        "423": problem("The tenant is suspended (tenant-suspended)"),
        "429": problem("The tenant has as many requests in flight as it may (too-many-requests, with Retry-After)"),
        "503": problem("Tenant not ready, database pool exhausted, or data locked by another session beyond the lock timeout (with Retry-After)"),
        "504": problem("The statement ran longer than the tenant's statement timeout (statement-timeout)")
    });
    let with = |mut extra: Value| {
        let m = extra.as_object_mut().unwrap();
        for (k, v) in common.as_object().unwrap() {
            m.entry(k.clone()).or_insert(v.clone());
        }
        extra
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tenantry API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Tenant-aware data API. The tenant comes from the Host, an X-Tenant header or the token's `tenant` claim; all that are present must agree. Each request runs as the tenant's PostgreSQL role inside its schema."},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/tenant": {"get": {"summary": "The resolved tenant", "responses": with(json!({"200": {"description": "Tenant", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Tenant"}}}}}))}},
            "/v1/tables": {"get": {"summary": "Tables and columns of the tenant schema", "responses": with(json!({"200": {"description": "Catalog"}}))}},
            "/v1/tables/{table}": {
                "parameters": [table],
                "get": {"summary": "Rows", "parameters": [filters,
                        {"name": "select", "in": "query", "schema": {"type": "string"}, "description": "Comma-separated columns"},
                        {"name": "order", "in": "query", "schema": {"type": "string"}, "description": "`col.asc|desc[.nullsfirst|.nullslast]`, comma-separated"},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
                        "responses": with(json!({"200": rows("Matching rows")}))},
                "post": {"summary": "Insert one object or an array of objects", "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}},
                         "responses": with(json!({"201": rows("Created rows (an object when one object was posted)"), "403": problem(QUOTA_403), "409": problem("Unique or foreign-key violation"), "413": problem("Body too large"), "422": problem("Not-null, check or generated-column violation")}))},
                "patch": {"summary": "Update filtered rows", "parameters": [filters, {"name": "x-tenantry-all-rows", "in": "header", "schema": {"type": "string", "enum": ["true"]}, "description": "Required to update without filters"}],
                          "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                          "responses": with(json!({"200": rows("Updated rows"), "403": problem(QUOTA_403), "409": problem("Constraint violation"), "422": problem("Constraint violation")}))},
                "delete": {"summary": "Delete filtered rows", "parameters": [filters, {"name": "x-tenantry-all-rows", "in": "header", "schema": {"type": "string", "enum": ["true"]}, "description": "Required to delete without filters"}],
                           "responses": with(json!({"200": rows("Deleted rows"), "409": problem("Still referenced")}))}
            },
            "/v1/tables/{table}/{id}": {"parameters": [table, {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "get": {"summary": "One row by primary key", "responses": with(json!({"200": {"description": "Row"}}))}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "Alive"}}}},
            "/readyz": {"get": {"summary": "Ready once the tenant registry has synced", "security": [], "responses": {"200": {"description": "Ready"}, "503": {"description": "Not synced yet"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "OpenMetrics text"}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Problem": {"type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "Tenant": {"type": "object", "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "displayName": {"type": "string"}, "hosts": {"type": "array", "items": {"type": "string"}}, "schema": {"type": "string"}, "migrationVersion": {"type": ["integer", "null"]}}}
            }
        }
    })
}

/// What the API knows of a column's type: how its values are written in JSON (bodies and
/// answers) and in filters. Types outside these are served unconstrained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int { min: i64, max: i64 },
    Numeric,
    Float,
    Boolean,
    Text,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    Json,
    Other,
}

/// The kind of a type as `format_type` writes it without modifiers (`Column::cast_sql`),
/// and whether it is an array of that kind.
pub fn kind_of(cast_sql: &str) -> (Kind, bool) {
    let (base, array) = match cast_sql.strip_suffix("[]") {
        Some(b) => (b, true),
        None => (cast_sql, false),
    };
    let kind = match base {
        "smallint" => Kind::Int {
            min: i16::MIN.into(),
            max: i16::MAX.into(),
        },
        "integer" => Kind::Int {
            min: i32::MIN.into(),
            max: i32::MAX.into(),
        },
        // Not -2^63: clients that read JSON numbers as doubles (JavaScript, Python's
        // validators) read -9223372036854775809 and -9.223372036854776e18 as -2^63, numbers
        // PostgreSQL rightly refuses as bigint. Without it the two readings agree on every
        // number.
        "bigint" => Kind::Int {
            min: i64::MIN + 1,
            max: i64::MAX,
        },
        "numeric" => Kind::Numeric,
        "double precision" => Kind::Float,
        "boolean" => Kind::Boolean,
        "text" | "character varying" | "character" | "bpchar" | "name" | "citext" => Kind::Text,
        "date" => Kind::Date,
        "timestamp without time zone" => Kind::Timestamp,
        "timestamp with time zone" => Kind::TimestampTz,
        "uuid" => Kind::Uuid,
        "json" | "jsonb" => Kind::Json,
        _ => Kind::Other,
    };
    (kind, array)
}

/// The length limit of `varchar(n)` / `char(n)` from the full type (`Column::type_sql`).
fn max_length(type_sql: &str) -> Option<u64> {
    let rest = type_sql
        .strip_prefix("character varying(")
        .or_else(|| type_sql.strip_prefix("character("))?;
    rest.strip_suffix(')')?.parse().ok()
}

/// `numeric(p,s)`'s bounds: values that round (to `s` places) below `10^(p-s)`.
fn numeric_bound(type_sql: &str) -> Option<f64> {
    let inner = type_sql.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = match inner.split_once(',') {
        Some((p, s)) => (p.trim().parse::<i32>().ok()?, s.trim().parse::<i32>().ok()?),
        None => (inner.trim().parse().ok()?, 0),
    };
    Some(10f64.powi(p - s) - 0.5 * 10f64.powi(-s))
}

/// Decimal numbers from 0 to `max` (no sign, no leading zeros), as a regular expression.
fn up_to(max: u64) -> String {
    let digits: Vec<u8> = max.to_string().bytes().map(|b| b - b'0').collect();
    let n = digits.len();
    let mut alts = vec!["0".to_string()];
    if n >= 2 {
        alts.push(format!("[1-9][0-9]{{0,{}}}", n - 2));
    }
    for i in 0..n {
        let lo = if i == 0 { 1 } else { 0 };
        if digits[i] > lo {
            let prefix: String = digits[..i].iter().map(|d| (b'0' + d) as char).collect();
            let range = if digits[i] - 1 == lo {
                format!("{lo}")
            } else {
                format!("[{lo}-{}]", digits[i] - 1)
            };
            let rest = n - i - 1;
            let tail = if rest == 0 {
                String::new()
            } else {
                format!("[0-9]{{{rest}}}")
            };
            alts.push(format!("{prefix}{range}{tail}"));
        }
    }
    alts.push(max.to_string());
    alts.dedup();
    format!("(?:{})", alts.join("|"))
}

const DATE: &str = "(?:[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[1-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[13579][26])00)-02-29)";
const TIME: &str = "(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\\.[0-9]{1,6})?)?";
const ZONE: &str = "(?:Z|[+-](?:0[0-9]|1[0-5])(?::[0-5][0-9](?::[0-5][0-9])?)?)";
const UUID: &str = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";

/// A value of `kind` as the API reads it in a filter (and, for the kinds written as JSON
/// strings, in a body): a regular expression in the subset that ECMA-262, Python and Rust
/// read alike. `None`: the kind has no comparable text form (JSON, unknown types).
pub fn value_pattern(kind: Kind) -> Option<String> {
    Some(match kind {
        // The type's whole range, -2^63 included: a filter's text is read exactly.
        Kind::Int { max, .. } => format!("(?:-?{}|-{})", up_to(max as u64), max as u64 + 1),
        Kind::Numeric => "-?[0-9]{1,100}(?:\\.[0-9]{1,100})?".into(),
        Kind::Float => "-?[0-9]{1,15}(?:\\.[0-9]{1,15})?".into(),
        Kind::Boolean => "(?:true|false)".into(),
        Kind::Text => "[^\\x00]*".into(),
        Kind::Date => format!("(?:{DATE}|infinity|-infinity)"),
        Kind::Timestamp => format!("(?:{DATE}[T ]{TIME}|infinity|-infinity)"),
        Kind::TimestampTz => format!("(?:{DATE}[T ]{TIME}{ZONE}?|infinity|-infinity)"),
        Kind::Uuid => UUID.into(),
        Kind::Json | Kind::Other => return None,
    })
}

/// The filter grammar for one column (what `query::parse` reads), as a pattern.
pub fn filter_pattern(col: &Column) -> String {
    let (kind, array) = kind_of(&col.cast_sql);
    let like = "(?:like|ilike)\\.(?:[^\\x00\\\\]|\\\\[^\\x00])*";
    let nulls = "|is\\.(?:null|notnull)";
    let truth = if kind == Kind::Boolean && !array {
        "|is\\.(?:true|false)"
    } else {
        ""
    };
    let compare = match (value_pattern(kind), array) {
        (Some(_), _) if kind == Kind::Text && !array => {
            let quoted = " *\"(?:[^\"\\\\\\x00]|\\\\[^\\x00])*\" *";
            let item = format!("(?:[^,\"\\x00]*|{quoted})");
            format!("|(?:eq|neq|lt|lte|gt|gte)\\.[^\\x00]*|in\\.\\((?:{item}(?:,{item})*)?\\)")
        }
        (Some(v), false) => {
            let item = format!(" *(?:{v}|\"{v}\") *");
            format!("|(?:eq|neq|lt|lte|gt|gte)\\.{v}|in\\.\\((?:{item}(?:,{item})*)?\\)")
        }
        _ => String::new(),
    };
    format!("^(?:{like}{nulls}{truth}{compare})$")
}

/// Whether rows can be ordered by the column: PostgreSQL has no ordering of `json`.
pub fn orderable(col: &Column) -> bool {
    !matches!(col.cast_sql.as_str(), "json" | "json[]")
}

/// Whether `raw` (a filter's value, `op.value`) is in the column's filter grammar, the
/// document's pattern for it: the API refuses what the document does not allow, so that
/// what reaches PostgreSQL always converts.
pub fn filter_allowed(col: &Column, raw: &str) -> bool {
    compiled(&filter_pattern(col)).is_match(raw)
}

/// The regular expression of `pattern`, compiled once per process: patterns depend on the
/// column's kind only, so there are few of them.
fn compiled(pattern: &str) -> std::sync::Arc<regex::Regex> {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex, OnceLock},
    };
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<regex::Regex>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry(pattern.to_string())
        .or_insert_with(|| Arc::new(regex::Regex::new(pattern).expect("a valid pattern")))
        .clone()
}

/// Why `v` is not a value of `col` as its JSON schema ([`value_schema`]) states, if it is
/// not. JSON null is left to the column's NOT NULL constraint.
pub fn check_value(col: &Column, v: &Value) -> Result<(), String> {
    let (kind, array) = kind_of(&col.cast_sql);
    match (v, array) {
        (Value::Null, _) => Ok(()),
        (Value::Array(items), true) => items
            .iter()
            .try_for_each(|item| check_one(kind, col, item).map_err(|e| format!("an item {e}"))),
        (_, true) => Err(format!("must be an array ({})", col.type_sql)),
        (v, false) => check_one(kind, col, v),
    }
}

/// Whether a JSON value holds U+0000 in a string or key, which PostgreSQL refuses to
/// convert to text (and jsonb to store).
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn check_one(kind: Kind, col: &Column, v: &Value) -> Result<(), String> {
    let ty = &col.type_sql;
    let ok = match (kind, v) {
        (_, Value::Null) => true,
        (Kind::Int { min, max }, Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => (min..=max).contains(&i),
            // 13105.0 is an integer to JSON. A double converts exactly to i128 (saturating
            // past it), and bigint's range leaves out -2^63, the one double that is also
            // the nearest of numbers below the range (see `kind_of`).
            (None, Some(f)) => {
                f.fract() == 0.0 && (min as i128..=max as i128).contains(&(f as i128))
            }
            _ => false,
        },
        // numeric(p,s)'s bounds are PostgreSQL's to check, in decimal: a double's
        // comparison at the boundary differs by a unit in the last place between parsers.
        (Kind::Numeric | Kind::Float, Value::Number(_)) => true,
        (Kind::Boolean, Value::Bool(_)) => true,
        // PostgreSQL text cannot hold U+0000.
        (Kind::Text, Value::String(s)) => {
            !s.contains('\0') && max_length(ty).is_none_or(|n| s.chars().count() as u64 <= n)
        }
        (Kind::Json, v) => !has_nul(v),
        (Kind::Date | Kind::Timestamp | Kind::TimestampTz | Kind::Uuid, Value::String(s)) => {
            let pattern = format!("^{}$", value_pattern(kind).expect("a string kind"));
            compiled(&pattern).is_match(s)
        }
        (Kind::Other, _) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "is not a value of type {ty} (see the column's schema in /v1/openapi.json)"
        ))
    }
}

fn nullable(mut schema: Value, nullable: bool) -> Value {
    if nullable {
        if let Some(t) = schema.get("type").cloned() {
            schema["type"] = json!([t, "null"]);
        }
    }
    schema
}

/// The JSON schema of one value of `col`, as bodies carry it and answers show it.
pub fn value_schema(col: &Column) -> Value {
    let (kind, array) = kind_of(&col.cast_sql);
    let string = |kind: Kind| json!({"type": "string", "pattern": format!("^{}$", value_pattern(kind).unwrap())});
    let one = match kind {
        Kind::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Kind::Numeric => match numeric_bound(&col.type_sql) {
            Some(b) if !array => {
                json!({"type": "number", "exclusiveMinimum": -b, "exclusiveMaximum": b})
            }
            _ => json!({"type": "number"}),
        },
        Kind::Float => json!({"type": "number"}),
        Kind::Boolean => json!({"type": "boolean"}),
        Kind::Text => {
            let mut s = string(Kind::Text);
            if let Some(n) = max_length(&col.type_sql).filter(|_| !array) {
                s["maxLength"] = n.into();
            }
            s
        }
        Kind::Date | Kind::Timestamp | Kind::TimestampTz | Kind::Uuid => string(kind),
        // PostgreSQL refuses \u0000 in a JSON value's strings and keys.
        Kind::Json => json!({"$ref": "#/components/schemas/JsonValue"}),
        Kind::Other => json!({}),
    };
    if array {
        let items = if one == json!({}) {
            one
        } else {
            nullable(one, true)
        };
        nullable(json!({"type": "array", "items": items}), col.nullable)
    } else {
        nullable(one, col.nullable)
    }
}

/// A regular expression matching exactly `s`.
fn literal(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Query parameters that are not column filters.
const RESERVED: &[&str] = &["select", "order", "limit", "offset"];

fn select_param(t: &Table) -> Value {
    let col = format!(
        "(?:{})",
        t.columns
            .iter()
            .map(|c| literal(&c.name))
            .collect::<Vec<_>>()
            .join("|")
    );
    json!({"name": "select", "in": "query", "required": false,
        "description": "Comma-separated columns to return (default: all)",
        "schema": {"type": "string", "pattern": format!("^{col}(?:,{col})*$")}})
}

fn filter_params(t: &Table) -> Vec<Value> {
    t.columns
        .iter()
        .filter(|c| !RESERVED.contains(&c.name.as_str()))
        .map(|c| {
            json!({"name": c.name, "in": "query", "required": false,
                "description": format!("Filter on {} ({}): `op.value` with op eq, neq, lt, lte, gt, gte, like, ilike (`*` is a wildcard), in.(a,b) (items with commas in double quotes), is.null, is.notnull, is.true, is.false", c.name, c.type_sql),
                "schema": {"type": "string", "pattern": filter_pattern(c)}})
        })
        .collect()
}

/// A `timestamptz` as answers show it: in the session's time zone, so a value written as
/// `1000-01-01T07:57+10:12` comes back as `0999-12-31T21:45:00+00:00` (and one near the end
/// of 9999 may come back in 10000).
const ANSWERED_TIMESTAMPTZ: &str = "^(?:[0-9]{4,5}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\\.[0-9]{1,6})?[+-][0-9]{2}(?::[0-9]{2}){0,2}|infinity|-infinity)$";

fn row_schema(t: &Table) -> Value {
    let props: Map<String, Value> = t
        .columns
        .iter()
        .map(|c| {
            let mut s = value_schema(c);
            if kind_of(&c.cast_sql) == (Kind::TimestampTz, false) {
                s["pattern"] = ANSWERED_TIMESTAMPTZ.into();
            }
            (c.name.clone(), s)
        })
        .collect();
    json!({"type": "object", "properties": props, "additionalProperties": false})
}

/// The body of a POST: required are the NOT NULL columns without a default; columns that
/// PostgreSQL computes are left out.
fn insert_schema(t: &Table) -> Value {
    let writable: Vec<&Column> = t.columns.iter().filter(|c| !c.read_only).collect();
    let props: Map<String, Value> = writable
        .iter()
        .map(|c| (c.name.clone(), value_schema(c)))
        .collect();
    let required: Vec<&str> = writable
        .iter()
        .filter(|c| !c.nullable && !c.has_default)
        .map(|c| c.name.as_str())
        .collect();
    let mut s = json!({"type": "object", "properties": props, "additionalProperties": false, "minProperties": 1});
    if !required.is_empty() {
        s["required"] = json!(required);
    }
    s
}

fn patch_schema(t: &Table) -> Value {
    let props: Map<String, Value> = t
        .columns
        .iter()
        .filter(|c| !c.read_only)
        .map(|c| (c.name.clone(), value_schema(c)))
        .collect();
    json!({"type": "object", "properties": props, "additionalProperties": false, "minProperties": 1})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// The document of one tenant: its tables, as its catalog has them.
pub fn tenant_document(tenant: &str, catalog: &Catalog, limits: &Limits) -> Value {
    let base = document();
    let common = base["paths"]["/v1/tables/{table}"]["get"]["responses"].clone();
    let with = |extra: Value| {
        let mut m = common.as_object().unwrap().clone();
        m.remove("200");
        for (k, v) in extra.as_object().unwrap() {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    };
    let all_rows = json!({"name": super::handlers::ALL_ROWS_HEADER, "in": "header", "required": false,
        "schema": {"type": "string", "enum": ["true"]},
        "description": "Required to change every row (no column filter)"});
    let mut paths = Map::new();
    paths.insert("/v1/tenant".into(), base["paths"]["/v1/tenant"].clone());
    paths.insert(
        "/v1/tables".into(),
        json!({"get": {"operationId": "listTables", "summary": "Tables and columns of the tenant schema",
            "responses": with(json!({"200": {"description": "Catalog", "content": json_content(json!({"$ref": "#/components/schemas/Catalog"}))}}))}}),
    );
    paths.insert(
        "/v1/openapi.json".into(),
        json!({"get": {"operationId": "openapi", "summary": "This document",
            "responses": with(json!({"200": {"description": "OpenAPI 3.1 document", "content": json_content(json!({"type": "object", "required": ["openapi", "paths"]}))}}))}}),
    );
    let mut schemas = base["components"]["schemas"].as_object().unwrap().clone();
    for t in catalog.tables.values() {
        let row_ref =
            json!({"$ref": format!("#/components/schemas/{}", component(&t.name, "Row"))});
        schemas.insert(component(&t.name, "Row"), row_schema(t));
        schemas.insert(component(&t.name, "Insert"), insert_schema(t));
        schemas.insert(component(&t.name, "Patch"), patch_schema(t));
        let rows = json!({"type": "array", "items": row_ref});
        let filters = filter_params(t);
        let order_cols: Vec<String> = t
            .columns
            .iter()
            .filter(|c| orderable(c))
            .map(|c| literal(&c.name))
            .collect();
        let mut get_params = filters.clone();
        get_params.push(select_param(t));
        if !order_cols.is_empty() {
            let item = format!(
                "(?:{})(?:\\.(?:asc|desc|nullsfirst|nullslast))*",
                order_cols.join("|")
            );
            get_params.push(json!({"name": "order", "in": "query", "required": false,
                "description": "`column[.asc|.desc][.nullsfirst|.nullslast]`, comma-separated",
                "schema": {"type": "string", "pattern": format!("^{item}(?:,{item})*$")}}));
        }
        get_params.push(json!({"name": "limit", "in": "query", "required": false,
            "schema": {"type": "integer", "minimum": 0, "maximum": limits.max_limit},
            "description": format!("Rows to return (default {})", limits.default_limit)}));
        get_params.push(json!({"name": "offset", "in": "query", "required": false,
            "schema": {"type": "integer", "minimum": 0, "maximum": limits.max_offset}}));
        let mut change_params = filters.clone();
        change_params.push(all_rows.clone());
        let name = &t.name;
        let op = |verb: &str| format!("{verb}_{name}");
        let item = json!({
            "get": {"operationId": op("list"), "summary": format!("Rows of {name}"), "parameters": get_params,
                    "responses": with(json!({"200": {"description": "Matching rows", "content": json_content(rows.clone())}}))},
            "post": {"operationId": op("insert"), "summary": format!("Insert into {name} one object or an array of objects"),
                     "requestBody": {"required": true, "content": json_content(json!({"oneOf": [
                         {"$ref": format!("#/components/schemas/{}", component(name, "Insert"))},
                         {"type": "array", "minItems": 1, "items": {"$ref": format!("#/components/schemas/{}", component(name, "Insert"))}}]}))},
                     "responses": with(json!({
                         "201": {"description": "The created row (an object when one object was posted), or rows", "content": json_content(json!({"oneOf": [row_ref.clone(), rows.clone()]}))},
                         "403": problem(QUOTA_403), "409": problem("Unique or foreign-key violation"), "413": problem("Body too large"),
                         "422": problem("Not-null, check or generated-column violation")}))},
            "patch": {"operationId": op("update"), "summary": format!("Update the filtered rows of {name}"), "parameters": change_params.clone(),
                      "requestBody": {"required": true, "content": json_content(json!({"$ref": format!("#/components/schemas/{}", component(name, "Patch"))}))},
                      "responses": with(json!({
                          "200": {"description": "Updated rows", "content": json_content(rows.clone())},
                          "403": problem(QUOTA_403), "409": problem("Unique or foreign-key violation"), "413": problem("Body too large"),
                          "422": problem("Not-null, check or generated-column violation")}))},
            "delete": {"operationId": op("delete"), "summary": format!("Delete the filtered rows of {name}"), "parameters": change_params,
                       "responses": with(json!({"200": {"description": "Deleted rows", "content": json_content(rows.clone())},
                                                "409": problem("Still referenced")}))}
        });
        paths.insert(format!("/v1/tables/{}", path_segment(name)), item);
        if let Some(pk) = t.primary_key.as_deref().and_then(|pk| t.column(pk).ok()) {
            let mut id = value_schema(&Column {
                nullable: false,
                ..pk.clone()
            });
            if id.get("type") == Some(&json!("string")) {
                id["minLength"] = 1.into();
                id["pattern"] = json!("^[^\\x00/]+$");
                if let Some(p) = value_pattern(kind_of(&pk.cast_sql).0)
                    .filter(|_| kind_of(&pk.cast_sql).0 != Kind::Text)
                {
                    id["pattern"] = json!(format!("^{p}$"));
                }
            }
            paths.insert(
                format!("/v1/tables/{}/{{id}}", path_segment(name)),
                json!({"get": {"operationId": op("get"), "summary": format!("One row of {name} by its primary key {}", pk.name),
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": id}, select_param(t)],
                    "responses": with(json!({"200": {"description": "The row", "content": json_content(row_ref)}}))}}),
            );
        }
    }
    schemas.insert(
        "JsonValue".into(),
        json!({"description": "Any JSON without \\u0000 in its strings or keys", "anyOf": [
            {"type": ["null", "boolean", "number"]},
            {"type": "string", "pattern": "^[^\\x00]*$"},
            {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
            {"type": "object", "propertyNames": {"pattern": "^[^\\x00]*$"}, "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}}]}),
    );
    schemas.insert(
        "Catalog".into(),
        json!({"type": "object", "required": ["tables"], "properties": {"tables": {"type": "array", "items": {
            "type": "object", "required": ["name", "columns", "primaryKey"], "properties": {
                "name": {"type": "string"}, "primaryKey": {"type": ["string", "null"]},
                "columns": {"type": "array", "items": {"type": "object", "required": ["name", "type", "nullable", "hasDefault"], "properties": {
                    "name": {"type": "string"}, "type": {"type": "string"}, "nullable": {"type": "boolean"}, "hasDefault": {"type": "boolean"}}}}}}}}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": format!("tenantry API: tenant {tenant}"), "version": env!("CARGO_PKG_VERSION"),
                 "description": "The data API of one tenant: one path per table of its schema, rows typed from the column types. Requests carry the tenant's token; the tenant comes from the Host, an X-Tenant header or the token's `tenant` claim (all that are present must agree)."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": base["components"]["securitySchemes"].clone(), "schemas": schemas}
    })
}

/// A component name for a table's schema: the name with anything outside `[A-Za-z0-9._-]`
/// replaced (component keys are restricted; table names are not).
fn component(table: &str, what: &str) -> String {
    let safe: String = table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.{what}")
}

/// Characters a path segment carries as they are (RFC 3986 unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A table name as a path segment (percent-encoded).
fn path_segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, type_sql: &str, cast_sql: &str, nullable: bool) -> Column {
        Column {
            name: name.into(),
            type_sql: type_sql.into(),
            cast_sql: cast_sql.into(),
            nullable,
            has_default: false,
            read_only: false,
        }
    }

    fn full(pattern: &str) -> regex::Regex {
        regex::Regex::new(&format!("^{pattern}$")).unwrap()
    }

    #[test]
    fn integer_patterns_hold_exactly_the_type_range() {
        for (ty, min, max) in [
            ("smallint", i16::MIN as i64, i16::MAX as i64),
            ("integer", i32::MIN as i64, i32::MAX as i64),
            ("bigint", i64::MIN, i64::MAX),
        ] {
            let re = full(&value_pattern(kind_of(ty).0).unwrap());
            for ok in [min, max, 0, -1, 1, max / 7, min / 3, max - 1, min + 1] {
                assert!(re.is_match(&ok.to_string()), "{ty} {ok}");
            }
            let past = |v: i64, d: i128| (v as i128 + d).to_string();
            for bad in [
                past(max, 1),
                past(min, -1),
                past(max, 10),
                "01".into(),
                "+1".into(),
                " 1".into(),
                "1.0".into(),
                "".into(),
            ] {
                assert!(!re.is_match(&bad), "{ty} {bad}");
            }
        }
        assert_eq!(up_to(9), "(?:0|[1-8]|9)");
        let re = full(&up_to(300));
        assert!((0..=300).all(|n| re.is_match(&n.to_string())));
        assert!((301..2000).all(|n| !re.is_match(&n.to_string())));
    }

    #[test]
    fn dates_are_calendar_dates() {
        let re = full(&value_pattern(Kind::Date).unwrap());
        for ok in [
            "2024-02-29",
            "2000-02-29",
            "1999-12-31",
            "2023-04-30",
            "infinity",
            "-infinity",
        ] {
            assert!(re.is_match(ok), "{ok}");
        }
        for bad in [
            "2023-02-29",
            "1900-02-29",
            "2023-04-31",
            "2023-13-01",
            "2023-00-10",
            "0999-01-01",
            "2023-1-1",
            "today",
        ] {
            assert!(!re.is_match(bad), "{bad}");
        }
        let re = full(&value_pattern(Kind::TimestampTz).unwrap());
        for ok in [
            "2024-01-02T03:04:05Z",
            "2024-01-02 03:04",
            "2024-01-02T03:04:05.123456+05:30",
            "2024-01-02T03:04:05-15",
        ] {
            assert!(re.is_match(ok), "{ok}");
        }
        for bad in [
            "2024-01-02T24:00:00",
            "2024-01-02T03:04:05+16",
            "2024-01-02T03:04:05.1234567",
        ] {
            assert!(!re.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn filters_follow_the_column_type() {
        let id = col("id", "bigint", "bigint", false);
        for ok in [
            "eq.5",
            "gte.-9223372036854775808",
            "in.(1, \"2\",3)",
            "in.()",
            "is.null",
            "like.1*",
            "neq.0",
        ] {
            assert!(filter_allowed(&id, ok), "{ok}");
        }
        for bad in [
            "eq.abc",
            "eq. 5",
            "is.true",
            "eq.9223372036854775808",
            "in.(1,a)",
            "like.a\\",
            "between.1",
            "eq.5\0",
        ] {
            assert!(!filter_allowed(&id, bad), "{bad:?}");
        }
        let done = col("done", "boolean", "boolean", true);
        assert!(filter_allowed(&done, "is.true") && filter_allowed(&done, "eq.false"));
        assert!(!filter_allowed(&done, "eq.yes"));
        let title = col("title", "text", "text", false);
        for ok in ["eq.anything at all", "in.(\"a, b\",c)", "like.a\\*b", "eq."] {
            assert!(filter_allowed(&title, ok), "{ok}");
        }
        for bad in ["eq.a\0b", "in.(\"a)", "is.false", "like.a\\"] {
            assert!(!filter_allowed(&title, bad), "{bad:?}");
        }
        let doc = col("doc", "json", "json", true);
        assert!(filter_allowed(&doc, "is.null") && !filter_allowed(&doc, "eq.{}"));
        assert!(!orderable(&doc) && orderable(&title));
    }

    #[test]
    fn body_values_must_be_of_the_column_type() {
        use serde_json::json;
        let small = col("n", "smallint", "smallint", true);
        assert!(check_value(&small, &json!(32767)).is_ok());
        assert!(check_value(&small, &json!(13105.0)).is_ok());
        assert!(check_value(&small, &json!(32768)).is_err());
        assert!(check_value(&small, &json!(1.5)).is_err());
        assert!(check_value(&small, &json!("5")).is_err());
        let big = col("n", "bigint", "bigint", true);
        let past_min: Value = serde_json::from_str("-9223372036854775809").unwrap();
        assert!(check_value(&big, &past_min).is_err());
        assert!(check_value(&big, &json!(i64::MIN)).is_err());
        assert!(check_value(&big, &json!(i64::MIN + 1)).is_ok());
        assert!(check_value(&big, &json!(i64::MAX)).is_ok());
        assert!(check_value(&big, &json!(-9.223372036854776e18)).is_err());
        assert!(check_value(&big, &json!(9.223372036854776e18)).is_err());
        assert!(check_value(&big, &json!(-9.223372036854775e18)).is_ok());
        // Read exactly: serde_json's quick float parsing reads this as ...574.5.
        let exact: Value = serde_json::from_str("-3642244945607574.0").unwrap();
        assert!(check_value(&big, &exact).is_ok());
        let code = col("c", "character varying(3)", "character varying", true);
        assert!(check_value(&code, &json!("abc")).is_ok());
        assert!(check_value(&code, &json!("abcd")).is_err());
        assert!(check_value(&code, &json!({})).is_err());
        assert!(check_value(&code, &json!(5)).is_err());
        assert!(check_value(&code, &json!("a\u{0}")).is_err());
        let day = col("d", "date", "date", true);
        assert!(check_value(&day, &json!("2024-02-29")).is_ok());
        assert!(check_value(&day, &json!("2023-02-29")).is_err());
        let tags = col("t", "text[]", "text[]", true);
        assert!(check_value(&tags, &json!(["a", null])).is_ok());
        assert!(check_value(&tags, &json!(["a", 1])).is_err());
        assert!(check_value(&tags, &json!("a")).is_err());
        let doc = col("j", "jsonb", "jsonb", true);
        assert!(check_value(&doc, &json!({"a": [1, "x"]})).is_ok());
        assert!(check_value(&doc, &json!({"a": ["\u{0}"]})).is_err());
    }

    #[test]
    fn the_tenant_document_has_a_path_per_table() {
        let mut c = Catalog::default();
        let mut id = col("id", "bigint", "bigint", false);
        id.has_default = true;
        id.read_only = true;
        c.tables.insert(
            "tasks".into(),
            Table {
                name: "tasks".into(),
                columns: vec![
                    id,
                    col("title", "character varying(20)", "character varying", false),
                    col("amount", "numeric(10,2)", "numeric", true),
                ],
                primary_key: Some("id".into()),
            },
        );
        c.tables.insert(
            "log entries".into(),
            Table {
                name: "log entries".into(),
                columns: vec![col(
                    "at",
                    "timestamp with time zone",
                    "timestamp with time zone",
                    true,
                )],
                primary_key: None,
            },
        );
        let doc = tenant_document("acme", &c, &Limits::default());
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/tables/tasks",
            "/v1/tables/tasks/{id}",
            "/v1/tables/log%20entries",
            "/v1/tenant",
            "/v1/tables",
            "/v1/openapi.json",
        ] {
            assert!(paths.contains_key(p), "{p}: {:?}", paths.keys());
        }
        assert!(!paths.contains_key("/v1/tables/log%20entries/{id}"));
        let s = &doc["components"]["schemas"];
        assert_eq!(s["tasks.Row"]["properties"]["title"]["maxLength"], 20);
        assert_eq!(
            s["tasks.Row"]["properties"]["amount"]["type"],
            json!(["number", "null"])
        );
        assert_eq!(
            s["tasks.Row"]["properties"]["amount"]["exclusiveMaximum"],
            99999999.995
        );
        assert_eq!(s["tasks.Insert"]["required"], json!(["title"]));
        let answered = regex::Regex::new(
            s["log_entries.Row"]["properties"]["at"]["pattern"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert!(answered.is_match("0999-12-31T21:45:00+00:00"));
        assert!(s["tasks.Insert"]["properties"]["id"].is_null());
        let get = &doc["paths"]["/v1/tables/tasks"]["get"];
        let names: Vec<&str> = get["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["id", "title", "amount", "select", "order", "limit", "offset"]
        );
        for status in ["200", "400", "401", "403", "404", "429", "503", "504"] {
            assert!(get["responses"][status].is_object(), "{status}");
        }
        assert_eq!(
            doc["paths"]["/v1/tables/tasks"]["post"]["responses"]["422"]["content"]
                ["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem"
        );
        // Every pattern compiles in the Rust dialect the API checks with.
        let text = doc.to_string();
        assert!(text.contains("pattern"));
        fn patterns(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                    ("pattern", Value::String(p)) => out.push(p.clone()),
                    _ => patterns(v, out),
                }),
                Value::Array(a) => a.iter().for_each(|v| patterns(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        patterns(&doc, &mut all);
        assert!(all.len() > 5);
        for p in all {
            regex::Regex::new(&p).unwrap();
        }
    }
}
