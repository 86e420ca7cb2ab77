#!/usr/bin/env bash
# On a GPU machine: unpack the folder scripts/gpu-bundle.sh made, then run the GPU tests
# and the GPU benchmark with it, writing their logs and results to --out.
#
# Usage: scripts/gpu-test.sh [--bundle DIR] [--out DIR] [--benchmark-args "ARGS"]
# Defaults: the bundle in .gpu-bundle/ beside this script's checkout; --out $OUT if set,
# else results/gpu. The machine needs an NVIDIA driver and CUDA 13's runtime, cuBLAS and
# cuRAND, found in the CUDA wheels of its own Python (nvidia/cu13/lib, as PyTorch installs
# them) or in CUDA_LIBS; hdf5, OpenBLAS and protobuf 3.21 (libprotobuf.so.32) from its system.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/.gpu-bundle"
out=${OUT:-$root/results/gpu}
benchmark_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift ;;
    --out) out="$2"; shift ;;
    --benchmark-args) benchmark_args="$2"; shift ;;
    *) echo "gpu-test.sh: unknown option '$1' (use --bundle DIR, --out DIR, --benchmark-args ARGS)" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '[gpu-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
fail() { echo "gpu-test.sh: $*" >&2; exit 1; }
[ -f "$bundle/MANIFEST" ] || fail "no bundle at $bundle; make one with scripts/gpu-bundle.sh"
mkdir -p "$out"
python_prefix=$(sed -n 's/^python_prefix=//p' "$bundle/MANIFEST")
py="$python_prefix/bin/python3"

work=$(mktemp -d /tmp/hybrid_infer_gpu.XXXXXX)
log "unpacking $bundle into $work"
# The Python runtime goes back to its own path (its binaries and Boost.Python name it);
# an existing one (the build machine itself) is left alone.
[ -x "$py" ] || tar -xJf "$bundle/python.tar.xz" -C / || fail "cannot unpack the Python runtime"
mkdir -p "$work/site"
tar -xJf "$bundle/site.tar.xz" -C "$work/site" || fail "cannot unpack the Python packages"
for part in caffe libs; do
  tar -xJf "$bundle/$part.tar.xz" -C "$work" || fail "cannot unpack $part"
done
tar -xJf "$bundle/project.tar.xz" -C "$work" || fail "cannot unpack the project"
if [ -f "$bundle/models.tar.xz" ]; then
  mkdir -p "$work/shared" && tar -xJf "$bundle/models.tar.xz" -C "$work/shared" || fail "cannot unpack the models"
fi

cuda_libs=${CUDA_LIBS:-$(python3 - 2>/dev/null <<'PY'
import os, nvidia
print(next(p for d in nvidia.__path__ for p in [os.path.join(d, "cu13", "lib")] if os.path.isdir(p)))
PY
)}
[ -n "$cuda_libs" ] || fail "no CUDA 13 libraries found (nvidia/cu13/lib of python3's packages); set CUDA_LIBS"
export LD_LIBRARY_PATH="$work/libs:$work/caffe/lib:$cuda_libs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$work/site:$work/caffe/python:$work/project:$work/project/graphs/python_layers"
export PYTHONNOUSERSITE=1 GLOG_minloglevel=2 PYTHONUNBUFFERED=1
missing=$(ldd "$work"/caffe/lib/libcaffe.so.* "$work/caffe/python/caffe/_caffe.so" \
  "$work/caffe/python/hybrid_infer_native.so" | grep "not found" | sort -u)
[ -z "$missing" ] || fail "shared libraries missing on this machine:
$missing"

{
  log "machine: $(hostname), $(nvidia-smi -L 2>&1 | head -4 | tr '\n' ' ')"
  log "bundle: $(tr '\n' ' ' < "$bundle/MANIFEST")"
  log "CUDA libraries from $cuda_libs"
} | tee "$out/gpu-environment.log"

cd "$work/project" || fail "no project in the bundle"
log "GPU tests"
"$py" -m pytest -v -rs -p no:cacheprovider tests/test_caffe_gpu.py tests/test_native_blob.py \
  tests/test_handoffs.py 2>&1 | tee "$out/gpu-tests.log"
tests_status=${PIPESTATUS[0]}
log "GPU benchmark"
# shellcheck disable=SC2086  # extra arguments are a word list
"$py" scripts/gpu_benchmark.py --models-dir "$work/shared/models" --out "$out" $benchmark_args 2>&1 \
  | tee "$out/gpu-benchmark.log"
bench_status=${PIPESTATUS[0]}
rm -rf "$work"
log "tests exit $tests_status, benchmark exit $bench_status; logs in $out"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
