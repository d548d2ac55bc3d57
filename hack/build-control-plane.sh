#!/usr/bin/env bash
# Builds (once) the binaries of the local test bed from Go modules and prints the
# directory holding them. The cache lives outside the work tree, keyed by version:
#   ${SHOAL_CACHE_DIR:-~/.cache/shoal}/bin/<component>-<version>/
# KUBEBUILDER_ASSETS (envtest's convention) is honoured for any binary it holds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
out=$cache/bin/current-$KUBE_VERSION-$ETCD_VERSION-$KWOK_VERSION-$HELM_VERSION
mkdir -p "$out"

log() { printf '[shoal] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null || { log "ERROR: Go >= 1.26 is needed to build the local control plane (or set KUBEBUILDER_ASSETS / SHOAL_TEST_KUBECONFIG)"; exit 1; }
}

# Runs "$@" with a heartbeat so a slow cold build is never silent.
with_progress() {
  local what=$1; shift
  local logf; logf=$(mktemp)
  local start=$SECONDS
  log "building $what (first time only; several minutes on 2 cores)..."
  "$@" >"$logf" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 15
    if kill -0 "$pid" 2>/dev/null; then
      log "  still building $what: $((SECONDS - start))s elapsed, $(grep -c . "$logf" || true) packages compiled"
    fi
  done
  if ! wait "$pid"; then
    log "ERROR: building $what failed; last lines:"
    tail -n 30 "$logf" >&2
    rm -f "$logf"
    exit 1
  fi
  rm -f "$logf"
  log "built $what in $((SECONDS - start))s"
}

# A binary is taken from KUBEBUILDER_ASSETS when it is there, else from the cache.
have() {
  local name=$1
  if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$name" ]]; then
    ln -sf "$KUBEBUILDER_ASSETS/$name" "$out/$name"
  fi
  [[ -x "$out/$name" ]]
}

build_kubernetes() {
  local missing=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    have "$b" || missing+=("$b")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  need_go
  local ver=${KUBE_VERSION#v} minor
  minor=$(cut -d. -f2 <<<"$ver")
  local w=$cache/src/kubernetes-$KUBE_VERSION
  mkdir -p "$w"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 through replace
  # directives that only work inside its own tree; mirror them at the release tag.
  if [[ ! -f "$w/go.mod.done" ]]; then
    log "resolving k8s.io/kubernetes@$KUBE_VERSION staging modules..."
    local gomod
    gomod=$(cd "$w" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
      echo "module shoal.dev/hack/kubernetes"
      echo "go 1.26"
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      grep -E '=> \./staging/src/' "$gomod" | awk -v v="v0.${ver#1.}" '{print "replace " $1 " => " $1 " " v}'
    } >"$w/go.mod"
    touch "$w/go.mod.done"
  fi
  local pkgs=()
  for b in "${missing[@]}"; do
    case $b in
      kubectl) pkgs+=(k8s.io/kubernetes/cmd/kubectl) ;;
      *) pkgs+=("k8s.io/kubernetes/cmd/$b") ;;
    esac
  done
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  with_progress "Kubernetes $KUBE_VERSION (${missing[*]})" \
    bash -c 'cd "$1" && shift && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -v -trimpath -ldflags "$1" -o "$2/" "${@:3}"' _ \
    "$w" "$ld" "$out" "${pkgs[@]}"
}

build_etcd() {
  have etcd && return
  need_go
  local w=$cache/src/etcd-$ETCD_VERSION
  mkdir -p "$w"
  printf 'module shoal.dev/hack/etcd\ngo 1.26\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$w/go.mod"
  with_progress "etcd $ETCD_VERSION" \
    bash -c 'cd "$1" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -v -trimpath -ldflags "-s -w" -o "$2/etcd" go.etcd.io/etcd/server/v3' _ "$w" "$out"
}

go_install() {
  local name=$1 pkg=$2 ver=$3
  have "$name" && return
  need_go
  with_progress "$name $ver" \
    env GOBIN="$out" CGO_ENABLED=0 go install -v -trimpath -ldflags "-s -w" "$pkg@$ver"
}

build_etcd
go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_kubernetes
echo "$out"
