//! The Tenant reconciler and its runtime: a kube-runtime `Controller` over Tenants (and the
//! Secrets they own), a pipeline per Tenant — validate → role → schema → migrations →
//! credentials → status — behind kube-runtime's finalizer helper, and the health server.

mod cleanup;
mod context;
mod credentials;
mod error;
mod gateway;
mod provision;
mod reconcile;
mod rollout;
mod runtime;

pub use context::Context;
pub use error::{Error, Stage};
pub use gateway::{ensure_gateway, GatewayError};
pub use reconcile::{error_policy, reconcile, FIELD_MANAGER};
pub use rollout::RolloutPolicy;
pub use runtime::{run, RunError, Settings};
