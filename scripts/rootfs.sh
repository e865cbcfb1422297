#!/usr/bin/env bash
# Build (once) and cache a Debian 13 "trixie" root for one architecture, OUTSIDE the repo.
#
# Why: the Lambda python3.13 runtime needs kernels compiled by Python 3.13 (the host has 3.11),
# and numba cannot cross-compile, so arm64 kernels are built inside an arm64 root run through
# qemu-user-static. Each root holds two venvs:
#   /opt/build  numpy + numba + setuptools  (AOT-compiles the kernels; never shipped)
#   /opt/proof  awslambdaric only           (runs a layer the way Lambda does; no numpy, no numba)
#
# usage: scripts/rootfs.sh amd64|arm64      prints the root's path on stdout when ready
# env:   FSD_ROOTFS_CACHE  cache directory (default /var/cache/fsd-inference)
#        FSD_DEBIAN_MIRROR Debian mirror    (default: the host's apt source, else deb.debian.org)
set -euo pipefail

die() { echo "rootfs.sh: error: $*" >&2; exit 2; }
log() { echo "rootfs.sh: $*" >&2; }

arch="${1:-}"
case "$arch" in
  amd64|arm64) ;;
  *) die "usage: $0 amd64|arm64 (got '${arch}')" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and binfmt registration need it)"

cache="${FSD_ROOTFS_CACHE:-/var/cache/fsd-inference}"
root="$cache/trixie-$arch"
suite=trixie
apt_packages="python3 python3-venv python3-pip python3-dev gcc g++ binutils ca-certificates"
build_packages="numpy numba setuptools"
proof_packages="awslambdaric"
# The root is rebuilt step by step whenever these lists change (the stamp records them).
stamp="apt: $apt_packages; build: $build_packages; proof: $proof_packages"

install_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ "$arch" = arm64 ]; then
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  fi
  [ ${#missing[@]} = 0 ] && return
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

register_qemu_aarch64() {
  # The kernel runs aarch64 ELF files through qemu once this binfmt entry exists.
  local binfmt=/proc/sys/fs/binfmt_misc
  [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt" \
    || die "cannot mount binfmt_misc"
  [ -e "$binfmt/qemu-aarch64" ] && return
  local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -r "$conf" ] || die "$conf missing (install qemu-user-static)"
  grep -v '^#' "$conf" | grep . | head -n1 > "$binfmt/register" \
    || die "cannot register qemu-aarch64 with binfmt_misc"
}

debian_mirror() {
  if [ -n "${FSD_DEBIAN_MIRROR:-}" ]; then echo "$FSD_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(grep -hoE '^URIs: *https?://[^ ]*/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | head -n1 | sed 's/^URIs: *//') || true
  echo "${uri:-http://deb.debian.org/debian}"
}

in_root() {
  # Run a command inside the root with a clean environment (no host pip/Python settings).
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

with_proc() {
  # Run "$@" with /proc mounted inside the root (pip and venv need it), unmounting after.
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  local rc=0
  "$@" || rc=$?
  umount "$root/proc" || true
  return $rc
}

install_packages() {
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  in_root apt-get update -qq >&2
  in_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends $apt_packages >&2
  in_root python3 -m venv /opt/build
  in_root /opt/build/bin/pip install -q --only-binary=:all: $build_packages >&2
  in_root python3 -m venv /opt/proof
  in_root /opt/proof/bin/pip install -q --only-binary=:all: $proof_packages >&2
}

install_host_tools
[ "$arch" = arm64 ] && register_qemu_aarch64

if [ -f "$root/.fsd-ready" ] && [ "$(cat "$root/.fsd-ready")" = "$stamp" ]; then
  echo "$root"
  exit 0
fi

mkdir -p "$cache"
if [ ! -d "$root" ]; then
  staging="$root.partial"
  if [ ! -f "$staging/.debootstrap-done" ]; then
    rm -rf "$staging"
    log "debootstrap $suite $arch into $staging (several minutes)"
    debootstrap --arch="$arch" --variant=minbase --include="${apt_packages// /,}" \
      "$suite" "$staging" "$(debian_mirror)" >&2
    touch "$staging/.debootstrap-done"
  fi
  mv "$staging" "$root"
fi
start=$(date +%s)
with_proc install_packages
log "packages installed in $(( $(date +%s) - start )) s"
echo "$stamp" > "$root/.fsd-ready"
echo "$root"
