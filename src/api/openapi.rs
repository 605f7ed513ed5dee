//! The OpenAPI 3.1 description of the API, served at `/openapi.json`.

use serde_json::{json, Value};

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
