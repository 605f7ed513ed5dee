#!/usr/bin/env bash
# Starts and stops a throwaway PostgreSQL cluster and a real kube-apiserver + etcd on loopback,
# for the tests and for the local dev stack.
#
#   scripts/stack.sh start DIR [--watch-pid PID]
#       Starts everything under DIR (random free ports) and writes DIR/env with
#       DATABASE_URL (admin, password auth over TCP) and KUBECONFIG. With --watch-pid, all of it
#       is stopped as soon as process PID exits (used by the test binary).
#   scripts/stack.sh stop DIR
#   scripts/stack.sh stop-pg DIR | start-pg DIR
#       Stops PostgreSQL in immediate mode (a crash: no checkpoint, every session cut) /
#       starts it again on the same port and data directory (crash recovery), for fault tests.
#   scripts/stack.sh start-server DIR NAME [--watch-pid PID]
#       Starts one more PostgreSQL cluster under DIR/servers/NAME (for tenants placed on
#       several servers) and prints its DATABASE_URL and port; stopped with the stack. Its
#       stop-pg/start-pg directory is DIR/servers/NAME.
#   scripts/stack.sh stop-apiserver DIR | start-apiserver DIR
#       Kills the kube-apiserver (SIGKILL; etcd keeps running) / starts it again on the same
#       port, certificates and etcd, and waits until it is ready.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pgbin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}

log() { echo "stack: $*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "$what did not come up in ${secs}s"
      return 1
    fi
    sleep 0.2
  done
}

start_postgres() {
  local dir=$1 port password
  port=$(free_port)
  password=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  mkdir -p "$dir/pg"
  echo "$password" >"$dir/pg/pwfile"
  [[ $(id -u) == 0 ]] && chown -R postgres: "$dir/pg"
  as_pg "$pgbin/initdb" -D "$dir/pg/data" -U postgres --pwfile="$dir/pg/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-sync >"$dir/pg/initdb.log" 2>&1
  cat >>"$dir/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/pg'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
log_min_messages = warning
CONF
  as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 start >/dev/null
  as_pg "$pgbin/psql" -h "$dir/pg" -p "$port" -U postgres -qAt -c "CREATE DATABASE tenantry" >/dev/null
  echo "DATABASE_URL=postgres://postgres:$password@127.0.0.1:$port/tenantry"
  echo "TENANTRY_PG_PORT=$port"
  echo "TENANTRY_PG_SOCKET_DIR=$dir/pg"
}

start_apiserver() {
  local dir=$1 assets etcd_port peer_port api_port
  assets=$("$here/test-apiserver.sh" assets)
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  mkdir -p "$dir/k8s/certs"
  "$assets/etcd" --data-dir "$dir/k8s/etcd" --name default \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
    >"$dir/k8s/etcd.log" 2>&1 &
  echo $! >"$dir/k8s/etcd.pid"
  openssl genrsa -out "$dir/k8s/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/k8s/sa.key" -pubout -out "$dir/k8s/sa.pub" 2>/dev/null
  echo 'admintoken,admin,admin-uid,"system:masters"' >"$dir/k8s/tokens.csv"
  # What `start-apiserver` needs to start it again on the same port.
  echo "$etcd_port $api_port" >"$dir/k8s/ports"
  run_apiserver "$dir"
  cat >"$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: admintoken
contexts:
- name: test
  context:
    cluster: test
    user: admin
    namespace: default
current-context: test
KC
  echo "KUBECONFIG=$dir/kubeconfig"
}

# Starts the kube-apiserver of DIR (ports from DIR/k8s/ports) and waits until it is ready.
run_apiserver() {
  local dir=$1 assets etcd_port api_port
  assets=$("$here/test-apiserver.sh" assets)
  read -r etcd_port api_port <"$dir/k8s/ports"
  "$assets/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" \
    --secure-port="$api_port" --bind-address=127.0.0.1 --cert-dir="$dir/k8s/certs" \
    --token-auth-file="$dir/k8s/tokens.csv" --authorization-mode=RBAC \
    --service-account-key-file="$dir/k8s/sa.pub" --service-account-signing-key-file="$dir/k8s/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/16 \
    >>"$dir/k8s/apiserver.log" 2>&1 &
  echo $! >"$dir/k8s/apiserver.pid"
  wait_for "kube-apiserver" 90 curl -skf -H "Authorization: Bearer admintoken" "https://127.0.0.1:$api_port/readyz"
}

stop_apiserver() {
  local dir=$1 pid
  pid=$(cat "$dir/k8s/apiserver.pid")
  kill -KILL "$pid" 2>/dev/null || true
  # Gone, so that a restart can bind its port.
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

stop_postgres() {
  as_pg "$pgbin/pg_ctl" -D "$1/pg/data" -m immediate -w stop >/dev/null
}

start_postgres_again() {
  as_pg "$pgbin/pg_ctl" -D "$1/pg/data" -l "$1/pg/server.log" -w -t 60 start >/dev/null
}

stop() {
  local dir=$1 server
  for server in "$dir"/servers/*/; do
    [[ -f $server/pg/data/postmaster.pid ]] &&
      as_pg "$pgbin/pg_ctl" -D "$server/pg/data" -m immediate stop >/dev/null 2>&1 || true
  done
  for f in "$dir"/k8s/apiserver.pid "$dir"/k8s/etcd.pid; do
    [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
  if [[ -f $dir/pg/data/postmaster.pid ]]; then
    as_pg "$pgbin/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  start)
    dir=${2:?usage: stack.sh start DIR [--watch-pid PID]}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ $(id -u) == 0 ]] && chmod 755 "$dir"
    {
      start_postgres "$dir"
      start_apiserver "$dir"
    } >"$dir/env.tmp" || { stop "$dir"; exit 1; }
    mv "$dir/env.tmp" "$dir/env"
    if [[ "${3:-}" == "--watch-pid" ]]; then
      watched=${4:?--watch-pid needs a PID}
      nohup bash -c "while kill -0 $watched 2>/dev/null; do sleep 1; done; '$here/stack.sh' stop '$dir'; rm -rf '$dir'" \
        >/dev/null 2>&1 &
    fi
    cat "$dir/env"
    ;;
  stop)
    stop "${2:?usage: stack.sh stop DIR}"
    ;;
  start-server)
    dir=${2:?usage: stack.sh start-server DIR NAME}
    name=${3:?usage: stack.sh start-server DIR NAME}
    [[ $name =~ ^[a-z0-9-]+$ ]] || { echo "stack: a server name is [a-z0-9-]+" >&2; exit 2; }
    mkdir -p "$dir/servers/$name"
    [[ $(id -u) == 0 ]] && chmod 755 "$dir/servers" "$dir/servers/$name"
    start_postgres "$dir/servers/$name" >"$dir/servers/$name/env" || { stop "$dir"; exit 1; }
    if [[ "${4:-}" == "--watch-pid" ]]; then
      watched=${5:?--watch-pid needs a PID}
      nohup bash -c "while kill -0 $watched 2>/dev/null; do sleep 1; done; '$here/stack.sh' stop '$dir'; rm -rf '$dir'" \
        >/dev/null 2>&1 &
    fi
    cat "$dir/servers/$name/env"
    ;;
  stop-pg)
    stop_postgres "${2:?usage: stack.sh stop-pg DIR}"
    ;;
  start-pg)
    start_postgres_again "${2:?usage: stack.sh start-pg DIR}"
    ;;
  stop-apiserver)
    stop_apiserver "${2:?usage: stack.sh stop-apiserver DIR}"
    ;;
  start-apiserver)
    run_apiserver "${2:?usage: stack.sh start-apiserver DIR}"
    ;;
  *)
    echo "usage: $0 start DIR [--watch-pid PID] | stop DIR | start-server DIR NAME | stop-pg DIR | start-pg DIR | stop-apiserver DIR | start-apiserver DIR" >&2
    exit 2
    ;;
esac
