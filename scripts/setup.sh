#!/usr/bin/env bash
# agentkernel host setup: one idempotent script for developer machines and CI (Debian 12, as root).
#
#   bash scripts/setup.sh            everything (packages, engines, Python env, agent, images)
#   bash scripts/setup.sh --quiet    the same with less chatter
#
# This script only bootstraps: Debian's Python, the virtualenv, the package (editable, with every extra)
# and its launcher. Everything else (system packages, engine configuration, dockerd, the agent and WASI
# shell, images, the oci rootfs cache, microVM guest images, the reference clients for the tests) is
# `agentkernel setup`, which checks every step before it acts: a second run changes nothing.
#   AGENTKERNEL_SETUP_IMAGES="busybox"     only these local images (default: busybox and debian)
#   AGENTKERNEL_SETUP_VM_IMAGES="IMAGE"    microVM guest images (default: agentkernel/busybox)
#   AGENTKERNEL_SETUP_FIRECRACKER=1        also install Firecracker (opt-in)
#   AGENTKERNEL_STORAGE_DIR, AGENTKERNEL_STORAGE_SIZE   the btrfs quota volumes (default /var/lib/agentkernel, 64G)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AGENTKERNEL_CACHE:-/var/cache/agentkernel}
STATE=${AGENTKERNEL_SETUP_STATE:-/var/lib/agentkernel-setup}
VENV="$REPO/.venv"
LOG_DIR=/var/log/agentkernel
QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1

step() { printf '==> %s\n' "$*" >&2; }
info() { [ "$QUIET" = 1 ] || printf '    %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts engines): sudo bash scripts/setup.sh"
mkdir -p "$CACHE" "$STATE" "$LOG_DIR"

BOOTSTRAP_PACKAGES=(python3 python3-venv python3-dev)

bootstrap_packages() {
  step "python (bootstrap)"
  local missing=()
  for p in "${BOOTSTRAP_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then info "python3, venv, headers present"; return; fi
  info "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1 \
    || { tail -20 "$LOG_DIR/apt.log" >&2; die "apt-get install failed (log: $LOG_DIR/apt.log)"; }
}

python_env() {
  step "python environment ($VENV)"
  # Debian's interpreter starts in ~10 ms; the CLI's start-up is part of every command's latency.
  if [ ! -x "$VENV/bin/python" ]; then /usr/bin/python3 -m venv "$VENV"; fi
  local want have
  want=$(cat "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)
  have=$(cat "$VENV/.agentkernel-installed" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    info "installing agentkernel and its dependencies"
    "$VENV/bin/pip" install -q --upgrade pip >"$LOG_DIR/pip.log" 2>&1 || true
    # the distribution was renamed to agentkernel-sandbox (same import name): drop the old editable one
    "$VENV/bin/pip" uninstall -q -y agentkernel >>"$LOG_DIR/pip.log" 2>&1 || true
    "$VENV/bin/pip" install -q -e "$REPO[all,dev]" >>"$LOG_DIR/pip.log" 2>&1 \
      || { tail -30 "$LOG_DIR/pip.log" >&2; die "pip install failed (log: $LOG_DIR/pip.log)"; }
    echo "$want" >"$VENV/.agentkernel-installed"
  else
    info "dependencies up to date"
  fi
  # Byte-compile everything once: the CLI's start-up must not pay for compiling (and environments
  # with PYTHONDONTWRITEBYTECODE never write the caches themselves).
  "$VENV/bin/python" -m compileall -q -j 0 "$REPO/agentkernel" "$VENV/lib" >/dev/null 2>&1 || true
  write_launcher
  ln -sf "$VENV/bin/agentkernel" /usr/local/bin/agentkernel
}

write_launcher() {
  # The console script pip writes runs `site` (every .pth file, ~3 ms): a third of the interpreter's
  # start-up, paid by every sandboxed command. This launcher starts Python with -S and puts the two
  # directories it needs on sys.path itself: the checkout in place of the script's own directory, the
  # virtualenv's packages after the standard library (their usual place: a stdlib import then never
  # lists or stats them first, and the warm path imports nothing from there).
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cat >"$VENV/bin/agentkernel.tmp" <<LAUNCHER
#!$VENV/bin/python -S
# agentkernel launcher, written by scripts/setup.sh (python -S: no site processing on the hot path)
import sys
sys.path[0] = "$REPO"
sys.path.append("$site")
from agentkernel.cli import entry
entry()
LAUNCHER
  chmod 755 "$VENV/bin/agentkernel.tmp"
  mv "$VENV/bin/agentkernel.tmp" "$VENV/bin/agentkernel"
}

host_setup() {
  # the rest of the host, for every backend that runs here (and the reference clients the tests use)
  local args=(setup -y --all --dev --reference-clients)
  [ "$QUIET" = 1 ] && args+=(--quiet)
  for i in ${AGENTKERNEL_SETUP_IMAGES:-}; do args+=(--image "$i"); done
  for i in ${AGENTKERNEL_SETUP_VM_IMAGES:-}; do args+=(--vm-image "$i"); done
  [ "${AGENTKERNEL_SETUP_FIRECRACKER:-0}" = 1 ] && args+=(-B firecracker)
  step "agentkernel ${args[*]}"
  "$VENV/bin/python" -m agentkernel "${args[@]}" || die "agentkernel setup failed"
}

bootstrap_packages
python_env
host_setup
step "setup complete"
