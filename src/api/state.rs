//! The state every handler shares: the registry reader, the pool, the settings, the metrics,
//! the catalog cache, the tenants' shares of the pool and the verified-token cache.

use std::sync::Arc;

use super::{
    auth::TokenCache,
    config::Settings,
    observe::ApiMetrics,
    pool::Pool,
    share::{TenantSlots, SLOT_WAIT},
    tx::CatalogCache,
};
use crate::registry::Registry;

/// Shared state of all handlers: one `Arc`, so that the several extractors of a request
/// clone one pointer rather than each field. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares.
pub struct Shared {
    pub registry: Registry,
    pub pool: Pool,
    /// The pools of other servers (`None`: this API serves its own server only).
    pub servers: Option<super::servers::ServerPools>,
    pub settings: Settings,
    pub metrics: ApiMetrics,
    pub(super) catalogs: CatalogCache,
    pub(super) slots: Arc<TenantSlots>,
    pub(super) tokens: TokenCache,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(registry: Registry, pool: Pool, settings: Settings) -> Self {
        Self::with_servers(registry, pool, None, settings)
    }

    /// Serving the tenants of other servers too, over `servers`.
    pub fn with_servers(
        registry: Registry,
        pool: Pool,
        servers: Option<super::servers::ServerPools>,
        settings: Settings,
    ) -> Self {
        let per_tenant = settings.limits.tenant_concurrency(pool.capacity());
        Self(Arc::new(Shared {
            slots: Arc::new(TenantSlots::new(per_tenant, SLOT_WAIT)),
            tokens: TokenCache::default(),
            registry,
            pool,
            servers,
            settings,
            metrics: ApiMetrics::default(),
            catalogs: CatalogCache::default(),
        }))
    }
}
