//! The pure domain, below both the operator and the API: the Tenant resource, identifiers,
//! the credentials contract, the routing rule, planning and status building, and the plain
//! data the operator keeps about PostgreSQL. Nothing here talks to the apiserver, serves HTTP
//! or opens a database connection; everything is unit-tested without a server.

pub mod crd;
pub mod credentials;
pub mod drift;
pub mod limits;
pub mod naming;
pub mod plan;
pub mod rollout;
pub mod rotation;
pub mod routing;
pub mod scram;
pub mod server;
pub mod state;
pub mod status;
pub mod template;
