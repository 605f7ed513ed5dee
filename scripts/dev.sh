#!/usr/bin/env bash
# Runs the whole system locally: PostgreSQL, a kube-apiserver + etcd, the tenantry operator,
# the tenantry API and an example Tenant. Runs and prints requests that work; Ctrl-C stops
# everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
scripts/setup.sh
cargo build --locked --quiet
dir=$(mktemp -d /tmp/tenantry-dev.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  scripts/stack.sh stop "$dir" || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
echo "Starting PostgreSQL and kube-apiserver in $dir ..."
scripts/stack.sh start "$dir" >/dev/null
set -a; source "$dir/env"; set +a
# The local apiserver is 1.20: no x-kubernetes-validations (see README, "Install").
kubectl apply --validate=false -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/tenants.tenantry.dev --timeout=60s >/dev/null

"$root/target/debug/tenantry" controller --demo-migrations --health-addr 127.0.0.1:8081 --base-domain tenants.localhost >"$dir/operator.log" 2>&1 &
pids+=($!)
until curl -sf http://127.0.0.1:8081/readyz >/dev/null; do
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$dir/operator.log"; exit 1; }
  sleep 0.3
done
kubectl apply -f examples/tenant-minimal.yaml >/dev/null
kubectl wait --for=condition=Ready tenant/acme --timeout=60s >/dev/null

# The API logs in as the gateway role, with the credentials the operator wrote.
gateway_uri=$(kubectl get secret tenantry-gateway -o jsonpath='{.data.uri}' | base64 -d)
DATABASE_URL=$gateway_uri "$root/target/debug/tenantry" api --listen 127.0.0.1:8080 \
  --metrics-listen 127.0.0.1:9090 --base-domain tenants.localhost >"$dir/api.log" 2>&1 &
pids+=($!)
until curl -sf http://127.0.0.1:8080/readyz >/dev/null; do
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$dir/api.log"; exit 1; }
  sleep 0.3
done
TOKEN=$("$root/target/debug/tenantry" token acme)
export TOKEN
run() {
  local shown
  shown=$(printf '%q ' "$@")
  echo "\$ ${shown//$TOKEN/\$TOKEN}"
  "$@"
  printf '\n\n'
}
echo
echo "Requests against the API (TOKEN=\$(target/debug/tenantry token acme)):"
echo
run curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/tenant
run curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"name":"launch","description":"first project"}' http://127.0.0.1:8080/v1/tables/projects
run curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8080/v1/tables/projects?select=id,name&order=name.asc'
run curl -s -H 'Host: acme.tenants.localhost' -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8080/v1/tables/projects/1'
run curl -s -H "Authorization: Bearer $TOKEN" -H 'X-Tenant: globex' http://127.0.0.1:8080/v1/tenant

cat <<MSG

tenantry is running. In another shell:

  export KUBECONFIG=$KUBECONFIG
  kubectl get tenants -o wide
  kubectl describe tenant acme
  kubectl get secret acme-db -o jsonpath='{.data.uri}' | base64 -d; echo
  psql "\$(kubectl get secret acme-db -o jsonpath='{.data.uri}' | base64 -d)" -c '\\dt'
  kubectl apply -f examples/tenant-full.yaml && kubectl wait --for=condition=Ready tenant/globex
  kubectl delete tenant acme
  curl -s http://127.0.0.1:8081/metrics | grep tenantry_
  curl -s http://127.0.0.1:9090/metrics | grep tenantry_api_
  export TOKEN=\$(target/debug/tenantry token acme)
  curl -s -H "Authorization: Bearer \$TOKEN" 'http://127.0.0.1:8080/v1/tables/tasks?status=eq.todo'
  curl -s http://127.0.0.1:8080/openapi.json

Admin database: $DATABASE_URL
Operator log:   $dir/operator.log
API log:        $dir/api.log
Press Ctrl-C to stop everything.
MSG
kubectl get tenants -o wide
wait "${pids[0]}"
