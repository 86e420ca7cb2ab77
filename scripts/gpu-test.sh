#!/usr/bin/env bash
# On a GPU machine: unpack the folder scripts/gpu-bundle.sh made, then run the GPU tests
# and the GPU benchmark with it, writing their logs and results to --out.
#
# Usage: scripts/gpu-test.sh [--bundle DIR] [--out DIR] [--benchmark-args "ARGS"] [--wheels DIR]
#                            [--skip-tests] [--skip-benchmark]
#        scripts/gpu-test.sh --stash DIR
# --stash DIR copies what DIR holds (the bundle or some of its files, or one folder of wheel
# pieces that scripts/gpu-bundle.sh --wheel cut) into /tmp/hybrid_infer_stash/ and exits: the machine keeps /tmp while it stays
# warm (30 s after a call), so a bundle and a large wheel travel over consecutive calls.
# --wheels DIR joins the pieces found in DIR/*/ (checked against DIR/01/SHA256SUMS) and
# unpacks the wheel ahead of the bundle's packages (onnxruntime-gpu replaces onnxruntime).
# Steps, each call started within 30 s of the last (carry the folder named):
#   carry .gpu-bundle/site.tar.xz, .gpu-bundle/python.tar.xz:  bash scripts/gpu-test.sh --stash .gpu-bundle
#   carry .gpu-pieces/01 and the bundle's other files: --stash .gpu-pieces/01 and --stash .gpu-bundle
#   carry .gpu-pieces/02:  bash scripts/gpu-test.sh --stash .gpu-pieces/02     (03, ...)
#   then:                  bash scripts/gpu-test.sh --bundle /tmp/hybrid_infer_stash/.gpu-bundle \
#                            --wheels /tmp/hybrid_infer_stash/pieces [--skip-benchmark]
#   and while warm:        the same with --skip-tests (the tests and the benchmark may each
#                          need most of one call's 10 minutes)
# Defaults: the bundle in .gpu-bundle/ beside this script's checkout; --out $OUT if set,
# else results/gpu. The machine needs an NVIDIA driver and CUDA 13's runtime, cuBLAS and
# cuRAND, found in the CUDA wheels of its own Python (nvidia/cu13/lib, as PyTorch installs
# them) or in CUDA_LIBS; hdf5, OpenBLAS and protobuf 3.21 (libprotobuf.so.32) from its system.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/.gpu-bundle"
out=${OUT:-$root/results/gpu}
benchmark_args=""
wheels=""
skip_tests=0
skip_benchmark=0
stash_root=/tmp/hybrid_infer_stash
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift ;;
    --out) out="$2"; shift ;;
    --benchmark-args) benchmark_args="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --skip-tests) skip_tests=1 ;;
    --skip-benchmark) skip_benchmark=1 ;;
    --stash)
      src="${2%/}"
      [ -d "$src" ] || { echo "gpu-test.sh: --stash $src is not a folder" >&2; exit 2; }
      case "$src" in
        *.gpu-pieces/*) dest="$stash_root/pieces/$(basename "$src")" ;;
        *) dest="$stash_root/$(basename "$src")" ;;
      esac
      # merged into what is stashed already: a folder may travel as parts over several calls
      mkdir -p "$dest" && cp -a "$src/." "$dest/" \
        || { echo "gpu-test.sh: cannot copy $src to $dest" >&2; exit 1; }
      printf '[gpu-test %(%H:%M:%S)T] stashed %s in %s (%s)\n' -1 "$src" "$dest" "$(du -sh "$dest" | cut -f1)"
      exit 0 ;;
    *) echo "gpu-test.sh: unknown option '$1' (use --bundle DIR, --out DIR, --benchmark-args ARGS, --wheels DIR," \
            "--skip-tests, --skip-benchmark, --stash DIR)" >&2; exit 2 ;;
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

extra_site=""
if [ -n "$wheels" ]; then
  sums="$wheels/01/SHA256SUMS"
  [ -f "$sums" ] || fail "no $sums: stash every folder of .gpu-pieces first"
  name=$(awk '{print $2}' "$sums")
  cat "$wheels"/*/part* > "$work/$name" || fail "cannot join the wheel pieces in $wheels"
  (cd "$work" && sha256sum -c --quiet "$sums") || fail "the joined $name does not match its checksum: a piece is missing or damaged"
  extra_site="$work/site-wheels"
  mkdir -p "$extra_site"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$work/$name" "$extra_site" \
    || fail "cannot unpack $name"
  rm -f "$work/$name"
  log "unpacked $name ahead of the bundle's packages"
fi

# CUDA 13's runtime and libraries (nvidia/cu13/lib) first, then every other nvidia/*/lib
# (cuDNN 9 for ONNX Runtime's CUDA provider lives in nvidia/cudnn/lib).
cuda_libs=${CUDA_LIBS:-$(python3 - 2>/dev/null <<'PY'
import glob, os, nvidia
dirs = [p for d in nvidia.__path__ for p in [os.path.join(d, "cu13", "lib")] if os.path.isdir(p)]
dirs += sorted(p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib")) if p not in dirs)
print(":".join(dirs))
PY
)}
[ -n "$cuda_libs" ] || fail "no CUDA 13 libraries found (nvidia/cu13/lib of python3's packages); set CUDA_LIBS"
export LD_LIBRARY_PATH="$work/libs:$work/caffe/lib:$cuda_libs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="${extra_site:+$extra_site:}$work/site:$work/caffe/python:$work/project:$work/project/graphs/python_layers"
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
tests_status=0
if [ "$skip_tests" = 0 ]; then
  log "GPU tests"
  "$py" -m pytest -v -rs -p no:cacheprovider tests/test_caffe_gpu.py tests/test_native_blob.py \
    tests/test_handoffs.py tests/test_onnxruntime_cuda.py 2>&1 | tee "$out/gpu-tests.log"
  tests_status=${PIPESTATUS[0]}
fi
bench_status=0
if [ "$skip_benchmark" = 0 ]; then
  log "GPU benchmark"
  # shellcheck disable=SC2086  # extra arguments are a word list
  "$py" scripts/gpu_benchmark.py --models-dir "$work/shared/models" --out "$out" $benchmark_args 2>&1 \
    | tee "$out/gpu-benchmark.log"
  bench_status=${PIPESTATUS[0]}
  if env -u PYTHONPATH -u LD_LIBRARY_PATH python3 -c 'import torch, torchvision' 2>/dev/null; then
    log "the GPU's limit: PyTorch + cuDNN + CUDA graphs on the same architectures"
    env -u PYTHONPATH -u LD_LIBRARY_PATH python3 scripts/gpu_torch_limit.py --out "$out" 2>&1 \
      | tee "$out/gpu-torch-limit.log"
  else
    log "no torch/torchvision in python3: the PyTorch limit is not measured"
  fi
fi
rm -rf "$work"
log "tests exit $tests_status, benchmark exit $bench_status; logs in $out"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
