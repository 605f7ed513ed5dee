//! tenantry: schema-per-tenant PostgreSQL on Kubernetes.
//!
//! Rooms: [`crd`] (the Tenant resource), [`naming`] (identifiers and quoting), [`postgres`]
//! (provisioning and migrations), [`controller`] (the reconcile pipeline), [`health`] and
//! [`telemetry`] (probes, metrics, logs), [`watch`] (one watch over several namespaces), [`cli`]
//! (the `tenantry` command line).
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod health;
pub mod leader;
pub mod postgres;
pub mod registry;
pub mod telemetry;
pub mod watch;
