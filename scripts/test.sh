#!/usr/bin/env bash
# Runs every test: unit tests, then integration and end-to-end tests against a throwaway
# PostgreSQL cluster and a real kube-apiserver + etcd that the test binary starts itself; then
# the version × admin matrix: the isolation (hostile), provisioning, API, deletion and servers suites on
# PostgreSQL 15 (Debian), 16, 17 and 18, each with a superuser admin and with an admin that has
# only CREATEROLE and owns the database (TENANTRY_TEST_ADMIN=createrole); beside it, the
# generated-input fuzz of the API (tests/fuzz/run.sh) with FUZZ_EXAMPLES (default 1000) cases
# per operation.
# Arguments are passed to the first `cargo test` (and skip the matrix and the fuzz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# Four tests at a time: they mostly wait on PostgreSQL, the apiserver and the processes they
# start (RUST_TEST_THREADS overrides).
RUST_TEST_THREADS=${RUST_TEST_THREADS:-4} cargo test --locked --lib --bins --tests "$@"
(($# == 0)) || exit 0

# The matrix runs the integration test binary itself, two stacks at a time (each run starts
# its own PostgreSQL and apiserver; the runs mostly wait on them).
it=$(cargo test --locked --test it --no-run 2>&1 | sed -n 's/.*Executable tests\/it\/main.rs (\(.*\))$/\1/p')
[[ -x "$it" ]] || { echo "test: no integration test binary" >&2; exit 1; }
logs=$(mktemp -d "${TMPDIR:-/tmp}/tenantry-matrix-XXXXXX")
failed=()

# The API fuzz runs beside the matrix (schemathesis spends CPU, the matrix mostly waits).
echo "test: the API fuzz, ${FUZZ_EXAMPLES:-1000} cases per operation (log $logs/fuzz.log)" >&2
FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-1000} tests/fuzz/run.sh >"$logs/fuzz.log" 2>&1 &
fuzz=$!

for major in 15 16 17 18; do
  pg_bin=
  [[ $major == 15 ]] || pg_bin=$(scripts/pg-server.sh "$major")
  pids=()
  for admin in superuser createrole; do
    # The full suite above ran on PostgreSQL 15 with a superuser admin.
    [[ $major != 15 || $admin != superuser ]] || continue
    log="$logs/pg$major-$admin.log"
    echo "test: PostgreSQL $major, $admin admin (${pg_bin:-Debian}; log $log)" >&2
    (
      [[ -z $pg_bin ]] || export PG_BIN=$pg_bin
      TENANTRY_TEST_ADMIN=$admin "$it" hostile:: provision:: deletion:: api:: servers:: >"$log" 2>&1
    ) &
    pids+=("$!:$major-$admin:$log")
  done
  for p in "${pids[@]}"; do
    IFS=: read -r pid name log <<<"$p"
    if wait "$pid"; then
      echo "test: PostgreSQL $name: $(grep '^test result' "$log")" >&2
    else
      cat "$log" >&2
      echo "test: PostgreSQL $name FAILED" >&2
      failed+=("$name")
    fi
  done
done
if wait "$fuzz"; then
  tail -n 40 "$logs/fuzz.log" >&2
else
  cat "$logs/fuzz.log" >&2
  failed+=("fuzz")
fi
((${#failed[@]} == 0)) || { echo "test: failures: ${failed[*]}" >&2; exit 1; }
