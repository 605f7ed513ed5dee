#!/usr/bin/env bash
# Runs every test: unit tests, then integration and end-to-end tests against a throwaway
# PostgreSQL cluster and a real kube-apiserver + etcd that the test binary starts itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo test --locked --lib --bins --tests "$@"
