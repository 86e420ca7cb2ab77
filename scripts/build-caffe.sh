#!/usr/bin/env bash
# Build pycaffe (brocolli-caffe 9.0.2, a Caffe fork with BVLC's and SSD layers) with its
# Makefile into a cache outside the repo, and print the install prefix on the last line.
#
# Usage: scripts/build-caffe.sh [--cuda] [--cuda-arch "90 89"] [--python PY]
# The prefix is keyed by the source hash, this script, the patch script and the flavour,
# so an edited recipe never reuses a stale build. A finished prefix holds a stamp file;
# a build that stops halfway leaves only a temporary folder that the next run removes.
# PREFIX/caffe-flags.env records the compiler and linker flags that code built against
# this Caffe must use (CPU_ONLY changes Caffe's headers), for scripts/build-native.sh.
# The CUDA flavour takes cuBLAS/cuRAND from PyPI wheels kept in a shared folder of the
# cache (CUDA 13's toolkit here lacks them): libcaffe.so keeps an rpath to it.
set -euo pipefail

VERSION=9.0.2
SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cuda=0
cuda_arch="90"
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --cuda-arch) cuda_arch="$2"; shift ;;
    --python) python="$2"; shift ;;
    *) echo "build-caffe.sh: unknown option '$1' (use --cuda, --cuda-arch LIST, --python PY)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[caffe %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

pyver=$("$python" -c 'import sys; print("%d%d" % sys.version_info[:2])')
flavour=cpu
[ "$cuda" = 1 ] && flavour="cuda-sm${cuda_arch// /-}"
key=$(cat "$here/build-caffe.sh" "$here/patch_caffe.py" | sha256sum | cut -c1-12)
cache=${HYBRID_INFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hybrid_infer}
prefix="$cache/caffe/brocolli-caffe-$VERSION-py$pyver-$flavour-$key"
if [ -f "$prefix/.complete" ]; then
  log "reusing cached build $prefix"
  echo "$prefix"
  exit 0
fi

mkdir -p "$cache/caffe"
exec 9>"$cache/caffe/.lock"
flock 9
work="$prefix.tmp"
rm -rf "$work"
mkdir -p "$work/downloads"

log "building Caffe $VERSION ($flavour) for $("$python" --version) into $prefix"
log "1/5 build environment (numpy 2 headers)"
"$python" -m venv "$work/buildenv"
"$work/buildenv/bin/pip" install -q --disable-pip-version-check "numpy==2.4.6" "protobuf==7.36.2" six
if [ "$cuda" = 1 ]; then
  cudalibs="$cache/caffe/nvidia-cublas-13.0.2.14-curand-10.4.0.35"
  if [ ! -f "$cudalibs/.complete" ]; then
    log "   cuBLAS and cuRAND wheels into $cudalibs"
    rm -rf "$cudalibs"
    "$work/buildenv/bin/pip" install -q --disable-pip-version-check --target "$cudalibs" \
      nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    touch "$cudalibs/.complete"
  fi
fi

log "2/5 source"
"$work/buildenv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$work/downloads" "brocolli-caffe==$VERSION"
echo "$SDIST_SHA256  $work/downloads/brocolli-caffe-$VERSION.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/downloads/brocolli-caffe-$VERSION.tar.gz" -C "$work"
src="$work/brocolli-caffe-$VERSION"

log "3/5 patches"
patch_args=("$src")
[ "$cuda" = 1 ] && patch_args+=(--cuda)
"$work/buildenv/bin/python" "$here/patch_caffe.py" "${patch_args[@]}" >&2

py_include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
py_libdir=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
np_include=$("$work/buildenv/bin/python" -c 'import numpy; print(numpy.get_include())')
{
  echo "USE_CUDNN := 0"
  echo "USE_OPENCV := 0"
  echo "USE_LEVELDB := 0"
  echo "USE_LMDB := 0"
  echo "USE_NCCL := 0"
  echo "WITH_PYTHON_LAYER := 1"
  echo "BLAS := open"
  echo "BLAS_INCLUDE := /usr/include/x86_64-linux-gnu/openblas-pthread"
  echo "PYTHON_INCLUDE := $py_include $np_include"
  echo "PYTHON_LIB := $py_libdir"
  echo "PYTHON_LIBRARIES := boost_python$pyver python${pyver:0:1}.${pyver:1}"
  echo "INCLUDE_DIRS := \$(PYTHON_INCLUDE) /usr/local/include /usr/include/hdf5/serial"
  echo "LIBRARY_DIRS := \$(PYTHON_LIB) /usr/local/lib /usr/lib /usr/lib/x86_64-linux-gnu/hdf5/serial"
  echo "LINKFLAGS := -Wl,-rpath,$py_libdir -Wl,-rpath,\\\$\$ORIGIN/../../lib"
  echo "BUILD_DIR := build"
  echo "DISTRIBUTE_DIR := distribute"
  echo "Q ?= @"
  if [ "$cuda" = 1 ]; then
    cu="$cudalibs/nvidia/cu13"
    mkdir -p "$work/cudalink"
    ln -sf "$(ls "$cu"/lib/libcublas.so.* | head -1)" "$work/cudalink/libcublas.so"
    ln -sf "$(ls "$cu"/lib/libcurand.so.* | head -1)" "$work/cudalink/libcurand.so"
    gencode=""
    for a in $cuda_arch; do gencode+=" -gencode arch=compute_$a,code=sm_$a"; done
    last=${cuda_arch##* }
    echo "CUDA_DIR := /usr/local/cuda"
    echo "CUDA_ARCH :=$gencode -gencode arch=compute_$last,code=compute_$last"
    echo "INCLUDE_DIRS += $cu/include"
    echo "LIBRARY_DIRS += $work/cudalink"
    echo "LINKFLAGS += -Wl,-rpath,$cu/lib"
  else
    echo "CPU_ONLY := 1"
  fi
} > "$src/Makefile.config"

log "4/5 compile (make -j$(nproc) all py; a CPU build takes about 4 minutes on 2 cores)"
total=$(find "$src/src/caffe" "$src/tools" -name '*.cpp' -not -path '*/test/*' | wc -l)
[ "$cuda" = 1 ] && total=$((total + $(find "$src/src/caffe" -name '*.cu' -not -path '*/test/*' | wc -l)))
(cd "$src" && make -j"$(nproc)" all py PYTHON="$work/buildenv/bin/python" > "$work/make.log" 2>&1) &
make_pid=$!
while kill -0 "$make_pid" 2>/dev/null; do
  sleep 15
  done_count=$(grep -cE '^(CXX|NVCC) ' "$work/make.log" || true)
  log "   compiled $done_count/$total sources"
done
if ! wait "$make_pid"; then
  tail -40 "$work/make.log" >&2
  log "make failed; full log: $work/make.log"
  exit 1
fi

log "5/5 install"
stage="$work/prefix"
mkdir -p "$stage/lib" "$stage/bin" "$stage/include" "$stage/python"
cp -a "$src"/build/lib/libcaffe.so* "$stage/lib/"
cp -a "$src"/build/tools/*.bin "$stage/bin/" 2>/dev/null || true
cp -a "$src/include/caffe" "$stage/include/"
cp -a "$src/build/src/caffe/proto/caffe.pb.h" "$stage/include/caffe/proto/"
cp -a "$src/python/caffe" "$stage/python/"
rm -rf "$stage/python/caffe/test" "$stage/python/caffe/_caffe.cpp"
find "$stage/python" -name __pycache__ -prune -exec rm -rf {} +
# _caffe.so is a symlink into the build tree: replace it with the file itself.
cp --remove-destination "$(readlink -f "$src/python/caffe/_caffe.so")" "$stage/python/caffe/_caffe.so"
printf 'brocolli-caffe %s %s key %s\n' "$VERSION" "$flavour" "$key" > "$stage/BUILD_INFO"
{
  echo "CAFFE_FLAVOUR=$flavour"
  if [ "$cuda" = 1 ]; then
    echo "CAFFE_CXXFLAGS=\"-I/usr/local/cuda/include -I$cu/include\""
    echo "CAFFE_LDFLAGS=\"-L/usr/local/cuda/lib64 -lcudart -Wl,-rpath,$cu/lib\""
  else
    echo "CAFFE_CXXFLAGS=-DCPU_ONLY"
    echo "CAFFE_LDFLAGS="
  fi
} > "$stage/caffe-flags.env"

PYTHONPATH="$stage/python" GLOG_minloglevel=2 "$work/buildenv/bin/python" -c \
  'import caffe; from caffe.proto import caffe_pb2; caffe.set_mode_cpu(); assert "Python" in caffe.layer_type_list()' >&2
touch "$stage/.complete"
rm -rf "$prefix"
mv "$stage" "$prefix"
rm -rf "$work"
log "done: $prefix"
echo "$prefix"
