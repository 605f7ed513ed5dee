//! One request, one transaction: [`in_tenant`] switches the pooled connection to the tenant's
//! role and schema for the length of a transaction, and [`CatalogCache`] remembers each tenant
//! schema's tables per migration version so that requests do not re-read the catalog.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use sqlx::{pool::PoolConnection, Connection, PgConnection, PgPool, Postgres};

use super::{error::ApiError, query::Catalog};
use crate::domain::naming::Ident;

/// Runs `f` in one transaction as the tenant role with the tenant schema as search_path.
///
/// Whose code runs in this session: the session user is the gateway role (refused by
/// `connect` if it is a superuser or bypasses RLS), which is a member of every tenant role;
/// `SET LOCAL ROLE` makes the tenant the current user for this transaction only. Tenant-made
/// functions, triggers and defaults that a statement fires run in this session, whose session
/// user outranks the tenant.
///
/// The connection goes back to the pool only once the transaction has ended cleanly; see
/// [`Checkout`].
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
    let mut checkout = Checkout {
        conn: pool.acquire().await?,
        clean: false,
    };
    let mut tx = checkout
        .conn
        .begin_with(begin_statement(schema, read_only, statement_timeout_ms))
        .await?;
    let out = f(&mut tx).await;
    let end = match out {
        Ok(_) => tx.commit().await,
        Err(_) => tx.rollback().await,
    };
    checkout.clean = end.is_ok();
    let out = out?;
    end?;
    Ok(out)
}

/// The statement that opens a request's transaction, in one round trip: the schema is a
/// validated identifier, the rest are constants. `pg_temp` is named last in the search_path
/// because, left out, it is searched first for relations and types (ahead of the tenant's
/// schema and even of pg_catalog, which stays implicitly first).
fn begin_statement(schema: &Ident, read_only: bool, statement_timeout_ms: u64) -> String {
    let mode = if read_only { "READ ONLY" } else { "READ WRITE" };
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED {mode}; SET LOCAL ROLE {schema}; SET LOCAL search_path TO {schema}, pg_temp; SET LOCAL statement_timeout = {statement_timeout_ms}"
    )
}

/// A pooled connection that returns to the pool only after its transaction ended cleanly
/// (committed, or rolled back when asked), and is closed in any other state. sqlx, left to
/// itself, returns a dropped connection to the pool after rolling back only the transaction it
/// knows it opened: one whose opening batch failed after `BEGIN` (say, at `SET LOCAL ROLE`)
/// went back inside an aborted transaction that every later request on it, of any tenant,
/// inherited; one whose request was cancelled mid-statement held its pool slot until the
/// abandoned statement ended.
struct Checkout {
    conn: PoolConnection<Postgres>,
    clean: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_switch_role_and_put_pg_temp_last() {
        let schema = Ident::parse("schema", "acme").unwrap();
        assert_eq!(
            begin_statement(&schema, true, 5000),
            r#"BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; SET LOCAL ROLE "acme"; SET LOCAL search_path TO "acme", pg_temp; SET LOCAL statement_timeout = 5000"#
        );
        assert!(begin_statement(&schema, false, 1)
            .starts_with("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE;"));
    }
}
