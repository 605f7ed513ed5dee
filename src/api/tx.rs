//! One request, one transaction: [`in_tenant`] switches the pooled connection to the tenant's
//! role and schema for the length of a transaction, and [`CatalogCache`] remembers each tenant
//! schema's tables per migration version so that requests do not re-read the catalog.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool};

use super::{error::ApiError, query::Catalog};
use crate::domain::naming::Ident;

/// Runs `f` in one transaction as the tenant role with the tenant schema as search_path.
///
/// Whose code runs in this session: the session user is the gateway role (refused by
/// `connect` if it is a superuser or bypasses RLS), which is a member of every tenant role;
/// `SET LOCAL ROLE` makes the tenant the current user for this transaction only. Tenant-made
/// functions, triggers and defaults that a statement fires run in this session, whose session
/// user outranks the tenant.
pub(super) async fn in_tenant<T, F>(
    pool: &PgPool,
    schema: &Ident,
    read_only: bool,
    statement_timeout_ms: u64,
    f: F,
) -> Result<T, ApiError>
where
    F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ApiError>>,
{
    let mut conn = pool.acquire().await?;
    let mode = if read_only { "READ ONLY" } else { "READ WRITE" };
    // One round trip: the schema is a validated identifier, the rest are constants.
    let begin = format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED {mode}; SET LOCAL ROLE {schema}; SET LOCAL search_path TO {schema}; SET LOCAL statement_timeout = {statement_timeout_ms}"
    );
    let mut tx = conn.begin_with(begin).await?;
    let out = f(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// A schema's catalog and the migration version it was read at.
type VersionedCatalog = (Option<i64>, Arc<Catalog>);

/// Catalog of each tenant schema, keyed by schema, valid for one migration version.
#[derive(Default)]
pub(super) struct CatalogCache {
    entries: Mutex<HashMap<String, VersionedCatalog>>,
}

impl CatalogCache {
    /// The catalog of `schema` at migration `version`, read on `conn` (inside the tenant's
    /// transaction) when the cache has none for that version.
    pub(super) async fn get(
        &self,
        conn: &mut PgConnection,
        schema: &Ident,
        version: Option<i64>,
    ) -> Result<Arc<Catalog>, ApiError> {
        let key = schema.as_str();
        if let Some((v, c)) = self.entries.lock().expect("catalog lock").get(key) {
            if *v == version {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(Catalog::load(conn, key).await?);
        self.entries
            .lock()
            .expect("catalog lock")
            .insert(key.to_string(), (version, c.clone()));
        Ok(c)
    }
}
