#!/usr/bin/env bash
# Runs every fleet benchmark, each beside its baseline, and prints the BENCHMARKS.md table.
# Needs wrk (installed here if missing) and the same prerequisites as the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2; }
cargo build --release --locked --benches --quiet
echo "| benchmark | tenantry | baseline (same run) | ratio | notes |"
echo "|---|---|---|---|---|"
for b in "provision 100" "provision 1000" "migrate 1000" "api 1 --tenant-max-concurrency 16" "api 100" "api 1000 --cold --noisy" "registry 10000"; do
  # shellcheck disable=SC2086
  cargo bench --locked --quiet --bench fleet -- $b "$@" | grep -E '^\| [a-zA-Z]' | grep -v '^| benchmark'
done
