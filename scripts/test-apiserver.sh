#!/usr/bin/env bash
# Provides a kube-apiserver + etcd pair for tests and the local dev stack.
#
#   scripts/test-apiserver.sh assets   print a directory holding `kube-apiserver` and `etcd`
#                                      (building kube-apiserver once if needed)
#
# If KUBEBUILDER_ASSETS is set (the controller-runtime envtest convention) and holds both
# binaries, it is used as is. Otherwise kube-apiserver is built from Debian's `kubernetes`
# source package with Debian's Go and cached under $TENANTRY_CACHE (default ~/.cache/tenantry),
# keyed by version; etcd comes from Debian's etcd-server package.
set -euo pipefail

cache=${TENANTRY_CACHE:-$HOME/.cache/tenantry}
version=1.20.2
out="$cache/kube-apiserver-$version"

log() { echo "test-apiserver: $*" >&2; }

need_root_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

build() {
  need_root_apt golang-go etcd-server rsync golang-github-modern-go-reflect2-dev dpkg-dev
  if [[ -x "$out/kube-apiserver" ]]; then
    return
  fi
  # deb-src entries derived from the configured mirrors, without naming a host.
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      >/etc/apt/sources.list.d/tenantry-src.sources
    apt-get update -qq
  fi
  local work="$cache/build"
  rm -rf "$work" && mkdir -p "$work"
  log "fetching Debian's kubernetes source package"
  (cd "$work" && apt-get source --download-only kubernetes >&2)
  local tarball
  tarball=$(ls "$work"/kubernetes_*.orig.tar.gz | head -n1)
  mkdir -p "$work/src"
  tar xzf "$tarball" -C "$work/src" --strip-components=1
  local src="$work/src"
  # The vendored reflect2 v1.0.1 crashes under Go >= 1.18 as soon as a custom resource is
  # decoded; Debian's v1.0.2 fixes it.
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#' \
    "$src/vendor/modules.txt" "$src/go.mod"
  mkdir -p "$src/.go/src/k8s.io"
  ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
  log "building kube-apiserver (several minutes)"
  mkdir -p "$work/home"
  (cd "$src" && GOPATH="$src/.go" GOFLAGS=-mod=vendor CGO_ENABLED=0 HOME="$work/home" \
    make WHAT=cmd/kube-apiserver >&2)
  mkdir -p "$out"
  cp "$src/_output/bin/kube-apiserver" "$out/kube-apiserver.tmp"
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
  rm -rf "$work"
  log "cached $out/kube-apiserver"
}

assets() {
  if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
    echo "$KUBEBUILDER_ASSETS"
    return
  fi
  build
  ln -sf /usr/bin/etcd "$out/etcd"
  echo "$out"
}

case "${1:-assets}" in
  assets) assets ;;
  build) build ;;
  *) echo "usage: $0 [assets|build]" >&2; exit 2 ;;
esac
