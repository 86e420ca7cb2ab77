#!/usr/bin/env bash
# Pack what a GPU run of hybrid_infer needs into one folder (default .gpu-bundle/, which
# .git/info/exclude keeps out of git), small enough to travel to a GPU machine that has
# a CUDA 13 driver and runtime but no package registry and no Boost.Python for our Python.
# scripts/gpu-test.sh unpacks it there and runs the GPU tests and benchmark.
#
# Usage: scripts/gpu-bundle.sh [--out DIR] [--models DIR] [--limit-mib N] [--cuda-arch LIST]
#                              [--wheel FILE [--pieces DIR] [--piece-mib N]]
# Needs .venv (scripts/setup.sh, either flavour); builds the CUDA Caffe and the native
# extension against it if the cache lacks them. What goes in, each as .tar.xz:
#   python   the Python runtime .venv is made from (Boost.Python is built for it), minus
#            site-packages, tests, tkinter, idlelib, ensurepip, lib2to3, headers, static lib;
#            unpacked at the same absolute path there, since the binaries name it
#   site     the Python packages hybrid_infer and its tests import, from .venv (cp311 builds)
#   caffe    the CUDA Caffe install (lib, python) and the native extension
#   libs     the shared libraries of this machine that the GPU machine lacks (glog, gflags,
#            Boost 1.74 filesystem/thread/python, libunwind); cuBLAS/cuRAND/cudart come
#            from the GPU machine's own CUDA wheels, never from here (cuBLASLt is 500 MB)
#   project  this checkout's files (tracked and not ignored)
#   models   the third-party test models (../shared/models), when present
# --wheel FILE (e.g. onnxruntime-gpu's cp311 wheel, about 244 MiB) is too large for one call
# to the GPU machine, so it is cut into pieces of at most --piece-mib MiB (default 44), one
# folder each under --pieces (default .gpu-pieces/, also excluded from git): 01/, 02/, ...
# with a SHA256SUMS file in 01/. Each piece travels in its own call and is kept in the
# machine's /tmp by `scripts/gpu-test.sh --stash`; gpu-test.sh --wheels puts it together.
# A call carries at most 64 MiB with the checkout itself (about 13 MiB), so 44 MiB pieces
# leave room; the bundle (about 53 MiB) travels as files split over two calls, e.g.
# site.tar.xz + python.tar.xz in one, the rest beside a piece in another.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/.gpu-bundle"
models="$root/../shared/models"
limit_mib=56
arch_args=()
wheel=""
pieces="$root/.gpu-pieces"
piece_mib=44
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --models) models="$2"; shift ;;
    --limit-mib) limit_mib="$2"; shift ;;
    --cuda-arch) arch_args=(--cuda-arch "$2"); shift ;;
    --wheel) wheel="$2"; shift ;;
    --pieces) pieces="$2"; shift ;;
    --piece-mib) piece_mib="$2"; shift ;;
    *) echo "gpu-bundle.sh: unknown option '$1' (use --out DIR, --models DIR, --limit-mib N, --cuda-arch LIST," \
            "--wheel FILE, --pieces DIR, --piece-mib N)" >&2
       exit 2 ;;
  esac
  shift
done
log() { printf '[bundle %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || { echo "gpu-bundle.sh: --wheel $wheel does not exist" >&2; exit 2; }
  case "$wheel" in *.whl) ;; *) echo "gpu-bundle.sh: --wheel $wheel is not a .whl file" >&2; exit 2 ;; esac
  rm -rf "$pieces"
  mkdir -p "$pieces/cut"
  split -b "${piece_mib}M" -d -a 2 "$wheel" "$pieces/cut/part"
  n=0
  for part in "$pieces"/cut/part*; do
    n=$((n + 1))
    dir=$(printf '%s/%02d' "$pieces" "$n")
    mkdir -p "$dir"
    mv "$part" "$dir/$(basename "$part")"
  done
  rmdir "$pieces/cut"
  (cd "$(dirname "$wheel")" && sha256sum "$(basename "$wheel")") > "$pieces/01/SHA256SUMS"
  log "cut $(basename "$wheel") into $n pieces of at most $piece_mib MiB under $pieces"
fi
pack() {  # pack NAME DIR PATHS... : DIR/PATHS into $out/NAME.tar.xz
  local name=$1 dir=$2
  shift 2
  tar -C "$dir" --exclude=__pycache__ --exclude='*.pyc' "${excludes[@]}" -cf - "$@" \
    | xz -T0 -9 > "$out/$name.tar.xz"
  log "   $name.tar.xz: $(du -h "$out/$name.tar.xz" | cut -f1)"
}

python="$root/.venv/bin/python"
[ -x "$python" ] || { echo "gpu-bundle.sh: no .venv; run scripts/setup.sh first" >&2; exit 2; }
caffe_prefix=$(PYTHON="$python" "$root/scripts/build-caffe.sh" --cuda "${arch_args[@]}" | tail -1)
native_dir=$("$root/scripts/build-native.sh" "$caffe_prefix" --python "$python" | tail -1)
base=$("$python" -c 'import sys; print(sys.base_prefix)')
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

rm -rf "$out"
mkdir -p "$out"
log "packing into $out (Caffe: $(cat "$caffe_prefix/BUILD_INFO"))"

excludes=(--exclude="lib/python$pyver/site-packages" --exclude="lib/python$pyver/test"
  --exclude="lib/python$pyver/idlelib" --exclude="lib/python$pyver/tkinter" --exclude="lib/python$pyver/ensurepip"
  --exclude="lib/python$pyver/lib2to3" --exclude="lib/python$pyver/config-*" --exclude=include --exclude='*.a')
pack python / "${base#/}"

excludes=(--exclude=tests --exclude=test --exclude='*.pyi' --exclude=onnx/backend)
site_packages=(numpy numpy.libs google six.py networkx onnx onnxruntime ml_dtypes typing_extensions.py
  flatbuffers packaging pytest _pytest py.py pluggy iniconfig pygments)
distributions=(numpy protobuf six networkx onnx onnxruntime ml_dtypes typing_extensions flatbuffers packaging
  pytest pluggy iniconfig pygments)  # their metadata too: pytest and pluggy read their versions from it
present=()
for p in "${site_packages[@]}"; do [ -e "$site/$p" ] && present+=("$p"); done
for d in "${distributions[@]}"; do
  for info in "$site/$d"-*.dist-info; do [ -e "$info" ] && present+=("$(basename "$info")"); done
done
pack site "$site" "${present[@]}"

excludes=(--exclude=include --exclude=bin)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/caffe" "$stage/libs"
cp -a "$caffe_prefix/lib" "$caffe_prefix/python" "$caffe_prefix/BUILD_INFO" "$stage/caffe/"
cp -a "$native_dir/hybrid_infer_native.so" "$stage/caffe/python/"
pack caffe "$stage" caffe

excludes=()
for lib in libglog.so.1 libgflags.so.2.2 libboost_filesystem.so.1.74.0 libboost_thread.so.1.74.0 \
           "libboost_python${pyver/./}.so.1.74.0" libunwind.so.8; do
  # awk reads to the end: stopping early would SIGPIPE ldconfig, which pipefail turns into a failure
  path=$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ && !found {print $NF; found = 1}')
  [ -n "$path" ] || { echo "gpu-bundle.sh: $lib not found on this machine" >&2; exit 1; }
  cp -L "$path" "$stage/libs/$lib"
done
pack libs "$stage" libs

(cd "$root" && git ls-files --cached --others --exclude-standard -z) > "$stage/files"
excludes=()
tar -C "$root" --null -T "$stage/files" --transform 's,^,project/,' -cf - | xz -T0 -9 > "$out/project.tar.xz"
log "   project.tar.xz: $(du -h "$out/project.tar.xz" | cut -f1)"

if [ -d "$models" ]; then
  pack models "$(dirname "$models")" "$(basename "$models")"
else
  log "   no test models at $models: the GPU tests that need them will skip"
fi

{
  echo "python_prefix=$base"
  echo "caffe_build=$(head -1 "$caffe_prefix/BUILD_INFO")"
  echo "packed=$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
} > "$out/MANIFEST"
total=$(du -sm "$out" | cut -f1)
log "bundle: ${total} MiB in $out"
if [ "$total" -gt "$limit_mib" ]; then
  echo "gpu-bundle.sh: the bundle is ${total} MiB, over the ${limit_mib} MiB limit" >&2
  exit 1
fi
echo "$out"
