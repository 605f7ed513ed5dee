#!/usr/bin/env bash
# Runs every test: unit tests, then integration and end-to-end tests against a throwaway
# PostgreSQL cluster and a real kube-apiserver + etcd that the test binary starts itself; then
# the isolation (hostile), provisioning and deletion suites again on PostgreSQL 16, 17 and 18;
# then the generated-input fuzz of the API (tests/fuzz/run.sh) with 200 cases per operation,
# which keeps the whole command near 20 minutes on a 2-core machine (FUZZ_EXAMPLES=1000 for the
# full run, about 20 minutes on its own).
# Arguments are passed to the first `cargo test` (and skip the version runs and the fuzz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo test --locked --lib --bins --tests "$@"
if (($# == 0)); then
  for major in 16 17 18; do
    pg_bin=$(scripts/pg-server.sh "$major")
    echo "test: PostgreSQL $major ($pg_bin)" >&2
    PG_BIN=$pg_bin cargo test --locked --test it -- hostile:: provision:: deletion::
  done
  FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-200} tests/fuzz/run.sh
fi
