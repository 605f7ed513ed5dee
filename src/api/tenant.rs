//! The [`TenantRequest`] extractor: resolves a request to one tenant from the registry (Host,
//! `X-Tenant`, the token's tenant claim, which must all agree), checks that the tenant is
//! not suspended (423, once the token is verified) and ready, then has [`auth::authorize_cached`] verify the token for that tenant.

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts, HeaderMap, StatusCode},
};
use serde_json::Value;

use super::{auth, error::ApiError, state::AppState};
use crate::{
    domain::naming::Ident,
    registry::{Entry, Lookup},
};

/// The request's tenant, resolved and authenticated.
pub struct TenantRequest {
    pub entry: Entry,
    /// The pool of the tenant's server.
    pub pool: super::pool::Pool,
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

/// Resolves the tenant of a request: Host (`<tenant>.<base domain>`, then exact `spec.hosts`),
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
        // The registry applies the routing rule: `<name>.<base domain>` is the Tenant called
        // `<name>`, whoever else lists that host.
        match state.registry.by_host(&host) {
            // A host the API does not route (its own Service name, say) names no tenant.
            Lookup::Unknown => {}
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
    // Nothing names a tenant: the token is missing, or is not one of ours (it has no tenant
    // claim). Either way the request is unauthenticated: 401, as when the tenant is named.
    found.map(|(_, e)| e).ok_or_else(|| match token {
        None => ApiError::unauthorized("a bearer token is required", "invalid_request"),
        Some(_) => ApiError::unauthorized("the request names no tenant and the token has no tenant claim: use the tenant's host or an X-Tenant header, or a token the API issued", "invalid_token"),
    })
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
        if info.suspended {
            // Only the tenant's own callers learn that it is suspended.
            auth::authorize_cached(token, &entry, &state.settings.auth, &state.tokens)?;
            return Err(ApiError::suspended(&info.name));
        }
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
        let claims = auth::authorize_cached(token, &entry, &state.settings.auth, &state.tokens)?;
        // The tenant's server's pool, opened now for a server's first request (after the
        // token: an anonymous caller opens no pool).
        // A tenant without `status.server` was provisioned before servers were recorded: on
        // the operator's default server, which is this API's own only if named so.
        let server = entry
            .info
            .server
            .as_deref()
            .unwrap_or(crate::domain::server::DEFAULT_SERVER);
        let pool = match Some(server).filter(|s| *s != state.settings.server) {
            None => state.pool.clone(),
            Some(server) => match &state.servers {
                Some(servers) => servers.get(server).await?,
                None => {
                    return Err(ApiError::unavailable(
                        "tenant-on-another-server",
                        format!(
                        "tenant {:?} lives on server {server:?}; this API serves server {:?} only",
                        entry.info.name, state.settings.server
                    ),
                        30,
                    ))
                }
            },
        };
        Ok(TenantRequest {
            entry,
            pool,
            schema,
            claims,
        })
    }
}
