//! Integration tests against a real kube-apiserver and a real PostgreSQL (see common/).
//! One test binary: fixtures start once, tests isolate by namespace and schema.

mod common;

mod api;
mod crd;
mod damage;
mod deletion;
mod drift;
mod e2e;
mod examples;
mod failures;
mod faults_infra;
mod faults_operator;
mod helm;
mod hostile;
mod limits;
mod live;
mod migrations;
mod provision;
mod rollout;
mod rotation;
mod servers;
mod suspend;
