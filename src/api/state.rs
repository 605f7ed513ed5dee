//! The state every handler shares: the registry reader, the pool, the settings, the metrics
//! and the catalog cache.

use std::sync::Arc;

use super::{config::Settings, observe::ApiMetrics, pool::Pool, tx::CatalogCache};
use crate::registry::Registry;

/// Shared state of all handlers. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub metrics: ApiMetrics,
    pub(super) catalogs: Arc<CatalogCache>,
}

impl AppState {
    pub fn new(registry: Registry, pool: Pool, settings: Settings) -> Self {
        Self {
            registry,
            pool,
            settings: Arc::new(settings),
            metrics: ApiMetrics::default(),
            catalogs: Arc::default(),
        }
    }
}
