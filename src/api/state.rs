//! The state every handler shares: the registry reader, the pool, the settings, the metrics,
//! the catalog cache and the tenants' shares of the pool.

use std::sync::Arc;

use super::{
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
}

impl AppState {
    pub fn new(registry: Registry, pool: Pool, settings: Settings) -> Self {
        let per_tenant = settings.limits.tenant_concurrency(pool.capacity());
        Self {
            slots: Arc::new(TenantSlots::new(per_tenant, SLOT_WAIT)),
            registry,
            pool,
            settings: Arc::new(settings),
            metrics: ApiMetrics::default(),
            catalogs: Arc::default(),
        }
    }
}
