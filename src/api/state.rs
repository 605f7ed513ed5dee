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

/// Shared state of all handlers. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub metrics: ApiMetrics,
    pub(super) catalogs: Arc<CatalogCache>,
    pub(super) slots: Arc<TenantSlots>,
    pub(super) tokens: Arc<TokenCache>,
}

impl AppState {
    pub fn new(registry: Registry, pool: Pool, settings: Settings) -> Self {
        let per_tenant = settings.limits.tenant_concurrency(pool.capacity());
        Self {
            slots: Arc::new(TenantSlots::new(per_tenant, SLOT_WAIT)),
            tokens: Arc::default(),
            registry,
            pool,
            settings: Arc::new(settings),
            metrics: ApiMetrics::default(),
            catalogs: Arc::default(),
        }
    }
}
