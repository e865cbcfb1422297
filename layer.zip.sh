#!/usr/bin/env bash
# Build the FSD-Inference Lambda layer(s): dist/fsd-inference-layer-<arch>-py<version>.zip
#
# Layout (Lambda unzips a layer to /opt; /opt/python is on the runtime's sys.path):
#   python/fsd_kernels   with _native.cpython-<ver>-<arch>-linux-gnu.so, the kernels compiled
#                        ahead of time by numba.pycc inside a Debian root of that architecture
#   python/fsd_runtime   with its package data (the embedded official network and images)
#   python/numpy         the manylinux wheel for that architecture and Python
#   python/zstandard     the codec's compressor (manylinux wheel)
# Nothing else: no numba/llvmlite/scipy, no tests, no host .pyc (boto3 comes from Lambda);
# bytecode compiled by the target Python, since Lambda's /opt is read-only.
# Beside each zip: <zip>.json, the publish-layer-version input (runtimes, architectures).
#
# usage: ./layer.zip.sh [--arch x86_64|arm64|all] [--python 3.13]
# needs: root (debootstrap/chroot, see scripts/rootfs.sh), python3 on the host.
set -euo pipefail

die() { echo "layer.zip.sh: error: $*" >&2; exit 2; }
log() { echo "layer.zip.sh: $*" >&2; }

MAX_ZIPPED_MB=50      # Lambda: direct upload limit
MAX_UNZIPPED_MB=250   # Lambda: function plus all its layers, unzipped
ZSTANDARD_REQUIREMENT="zstandard>=0.22,<1"  # the codec's compressor, as in pyproject.toml
# Python version -> Debian suite whose python3 is that version (the build root).
declare -A SUITE_OF_PYTHON=([3.13]=trixie)

arches=x86_64
python_version=3.13
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; arches="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a value"; python_version="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (usage: $0 [--arch x86_64|arm64|all] [--python 3.13])" ;;
  esac
done
case "$arches" in
  all) arches="x86_64 arm64" ;;
  x86_64|arm64) ;;
  *) die "unsupported --arch '$arches': choose x86_64, arm64 or all (Lambda's architectures)" ;;
esac
[ -n "${SUITE_OF_PYTHON[$python_version]:-}" ] \
  || die "unsupported --python '$python_version': supported: ${!SUITE_OF_PYTHON[*]} (a Debian root with that python3 is needed)"
for tool in python3 git chroot; do
  command -v "$tool" >/dev/null || die "missing tool '$tool'"
done
[ "$(id -u)" = 0 ] || die "must run as root (the build runs in a chroot)"

repo="$(cd "$(dirname "$0")" && pwd)"
dist="$repo/dist"
py_tag="cp${python_version/./}"

in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

stage_sources() {
  # The package files git does not ignore, from the working tree: what the tests see.
  local dest="$1"
  (cd "$repo" && git ls-files --cached --others --exclude-standard -- fsd_kernels fsd_runtime) \
    | while read -r path; do
        [ -f "$repo/$path" ] || continue   # deleted but still in the index
        mkdir -p "$dest/$(dirname "$path")"
        cp "$repo/$path" "$dest/$path"
      done
}

build_one() {
  local arch="$1" deb_arch wheel_arch
  case "$arch" in
    x86_64) deb_arch=amd64; wheel_arch=x86_64 ;;
    arm64) deb_arch=arm64; wheel_arch=aarch64 ;;
  esac
  local started; started=$(date +%s)
  root="$("$repo/scripts/rootfs.sh" "$deb_arch")"
  local have; have=$(in_root python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$have" = "$python_version" ] || die "the $deb_arch root has Python $have, not $python_version"

  local work=/tmp/fsd-layer-$arch-py$python_version
  rm -rf "$root$work"
  mkdir -p "$root$work/src" "$root$work/python"
  stage_sources "$root$work/src"

  log "$arch: compiling the kernels ahead of time (numba.pycc, Python $python_version)"
  # numba reads /proc/cpuinfo; mounted for the build only, unmounted even on failure.
  mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; trap 'umount "$root/proc"' EXIT; }
  local so
  so=$(in_root env -C "$work/src" FSD_KERNELS_BACKEND=jit NUMBA_CACHE_DIR="$work/numba-cache" \
       /opt/build/bin/python -m fsd_kernels._build --out "$work/src/fsd_kernels")
  if trap -p EXIT | grep -q umount; then umount "$root/proc"; trap - EXIT; fi
  local numpy_version
  numpy_version=$(in_root /opt/build/bin/python -c 'import numpy; print(numpy.__version__)')

  log "$arch: assembling python/ (fsd_kernels, fsd_runtime, numpy $numpy_version, $ZSTANDARD_REQUIREMENT)"
  cp -r "$root$work/src/fsd_kernels" "$root$work/src/fsd_runtime" "$root$work/python/"
  rm -f "$root$work/python/fsd_kernels/_build.py"
  # numpy: the same version the kernels were compiled against, as a manylinux wheel; zstandard:
  # the codec's compressor (without it workers fall back to zlib and cannot read zstd chunks).
  in_root /opt/build/bin/pip install -q --no-deps --no-compile --only-binary=:all: \
    --platform "manylinux_2_28_$wheel_arch" --platform "manylinux2014_$wheel_arch" \
    --python-version "$python_version" --implementation cp --abi "$py_tag" \
    --target "$work/python" "numpy==$numpy_version" "$ZSTANDARD_REQUIREMENT" >&2
  # zstandard: its C backend only, stripped (the wheel also ships a cffi twin, and debug symbols:
  # 23 MB unzipped instead of 1 MB).
  rm -f "$root$work/python/zstandard/"_cffi.*.so "$root$work/python/zstandard/backend_cffi.py"
  in_root find "$work/python/zstandard" -name '*.so' -exec strip --strip-unneeded {} + >&2
  find "$root$work/python" \( -name __pycache__ -o -name tests -o -name testing \) -type d -prune \
    -exec rm -rf {} +
  find "$root$work/python" -name '*.pyc' -delete
  rm -rf "$root$work/python/bin"
  # Bytecode by the target Python itself: Lambda's /opt is read-only, so without it every cold
  # start recompiles numpy's modules. unchecked-hash: valid whatever mtimes unzipping sets.
  in_root /opt/build/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    "$work/python" >&2

  log "$arch: checking symbol versions against Amazon Linux 2023 (glibc 2.34)"
  mapfile -t libs < <(cd "$root" && find ".$work/python" -name '*.so*' -type f | sed 's|^\.||')
  in_root env -C "$work/src" /opt/build/bin/python -m fsd_kernels._build --check-glibc "${libs[@]}" \
    | sed "s|$work/python/||" >&2

  mkdir -p "$dist"
  local name="fsd-inference-layer-$arch-py$python_version"
  python3 "$repo/scripts/zip_layer.py" "$root$work/python" "$dist/$name.zip" \
    --max-zipped-mb "$MAX_ZIPPED_MB" --max-unzipped-mb "$MAX_UNZIPPED_MB" \
    --metadata "$dist/$name.json" --runtime "python$python_version" --arch "$arch" \
    --description "FSD-Inference: AOT kernels ($(basename "$so")), fsd_runtime, numpy $numpy_version"
  rm -rf "$root$work"
  log "$arch: done in $(( $(date +%s) - started )) s"
}

for arch in $arches; do
  build_one "$arch"
done
