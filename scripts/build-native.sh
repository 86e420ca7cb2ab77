#!/usr/bin/env bash
# Build hybrid_infer's native extension (hybrid_infer/native/caffe_blob.cpp) against one
# Caffe install, into a cache folder, and print that folder on the last line.
#
# Usage: scripts/build-native.sh CAFFE_PREFIX [--python PY]
# The folder is keyed by the Caffe prefix (itself keyed by Caffe's recipe and flavour),
# the source and this script, so a rebuilt Caffe or an edited source never reuses a
# stale module. The extension must be compiled with the flags Caffe was built with
# (CPU_ONLY changes Caffe's headers): PREFIX/caffe-flags.env records them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_file="$here/../hybrid_infer/native/caffe_blob.cpp"
python=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: build-native.sh CAFFE_PREFIX [--python PY]" >&2; exit 2; }
prefix=$(cd "$1" && pwd)
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift ;;
    *) echo "build-native.sh: unknown option '$1' (use --python PY)" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '[native %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[ -f "$prefix/.complete" ] && [ -f "$prefix/caffe-flags.env" ] \
  || { echo "build-native.sh: $prefix is not a finished Caffe build of scripts/build-caffe.sh" >&2; exit 2; }
# shellcheck source=/dev/null
source "$prefix/caffe-flags.env"

pyver=$("$python" -c 'import sys; print("%d%d" % sys.version_info[:2])')
key=$(cat "$source_file" "$here/build-native.sh" | sha256sum | cut -c1-12)
cache=${HYBRID_INFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hybrid_infer}
out="$cache/native/$(basename "$prefix")-$key"
if [ -f "$out/.complete" ]; then
  log "reusing $out"
  echo "$out"
  exit 0
fi

log "compiling hybrid_infer_native against $prefix ($CAFFE_FLAVOUR)"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
py_include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
py_libdir=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
build_info=$(head -1 "$prefix/BUILD_INFO")
# shellcheck disable=SC2086  # the flags are word lists
g++ -std=c++17 -O2 -fPIC -shared -Wall -DBOOST_BIND_GLOBAL_PLACEHOLDERS -DBOOST_ALLOW_DEPRECATED_HEADERS -o "$out.tmp/hybrid_infer_native.so" "$source_file" \
  -DHYBRID_INFER_CAFFE_BUILD="\"$build_info\"" \
  -isystem "$prefix/include" -I"$py_include" -I/usr/include/hdf5/serial $CAFFE_CXXFLAGS \
  -L"$prefix/lib" -lcaffe -Wl,-rpath,"$prefix/lib" \
  -L"$py_libdir" -lboost_python"$pyver" -lpython"${pyver:0:1}.${pyver:1}" -Wl,-rpath,"$py_libdir" \
  -lglog $CAFFE_LDFLAGS

# Smoke test: the module finds pycaffe's Blob class and reads a blob's host memory.
PYTHONPATH="$prefix/python:$out.tmp" GLOG_minloglevel=2 "$python" - <<'PY' >&2
import ctypes, tempfile
import numpy as np
import caffe
import hybrid_infer_native as native
with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
    f.write('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }')
    f.flush()
    blob = caffe.Net(f.name, caffe.TEST).blobs["x"]
blob.data[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
host = np.ctypeslib.as_array((ctypes.c_float * 6).from_address(native.cpu_data(blob)))
assert host.tolist() == list(range(6)), host
assert native.data_head(blob) == "cpu"
PY
touch "$out.tmp/.complete"
rm -rf "$out"
mv "$out.tmp" "$out"
log "done: $out"
echo "$out"
