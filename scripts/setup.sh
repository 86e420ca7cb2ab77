#!/usr/bin/env bash
# One-command set-up: Debian packages, pycaffe (cached build), hybrid_infer's native
# extension compiled against that Caffe (cached), and .venv with hybrid_infer.
# Safe to re-run: every step skips what is already in place.
#
# Usage: scripts/setup.sh [--cuda [--cuda-arch "90"]]   (CUDA Caffe: see scripts/build-caffe.sh)
# With --cuda, .venv switches to the CUDA Caffe (cuDNN off); without, to the CPU one.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }
python=${PYTHON:-python3}
build_args=()
cuda=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) build_args+=(--cuda); cuda=1 ;;
    --cuda-arch) build_args+=(--cuda-arch "$2"); shift ;;
    *) echo "setup.sh: unknown option '$1' (use --cuda, --cuda-arch LIST)" >&2; exit 2 ;;
  esac
  shift
done

if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup.sh: $python is $("$python" --version 2>&1); Debian 12's Boost.Python is built for Python 3.11. Set PYTHON=python3.11." >&2
  exit 2
fi

apt_packages=(build-essential libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev
  libhdf5-dev libopenblas-dev libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-regex-dev libboost-python-dev graphviz)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# One set-up at a time builds: build-caffe.sh looks for a finished build before it takes its
# own lock, so two set-ups started together would both build (and swap the prefix under the
# first); serialised here, the second finds the first one's build and reuses it.
cache=${HYBRID_INFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hybrid_infer}
mkdir -p "$cache"
prefix=$(flock "$cache/.setup.lock" env PYTHON="$python" "$root/scripts/build-caffe.sh" "${build_args[@]}" | tail -1)

if [ ! -x "$root/.venv/bin/python" ]; then
  log "creating .venv"
  "$python" -m venv "$root/.venv"
fi
log "installing hybrid_infer and its Python dependencies into .venv"
"$root/.venv/bin/pip" install -q --disable-pip-version-check -e "$root[test,openvino]"
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: exactly one of them
# may be present. The CUDA flavour runs TensorRT segments on ONNX Runtime's CUDA provider
# where no TensorRT runtime supports the GPU (the [gpu] extra); the CPU flavour takes it out.
pip=("$root/.venv/bin/pip" --disable-pip-version-check -q)
if [ "$cuda" = 1 ]; then
  if ! "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1 || "${pip[@]}" show onnxruntime >/dev/null 2>&1; then
    log "replacing onnxruntime with onnxruntime-gpu (CUDA provider)"
    "${pip[@]}" uninstall -y onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
    "${pip[@]}" install -e "$root[gpu]"
    "${pip[@]}" uninstall -y onnxruntime >/dev/null 2>&1 || true
    "${pip[@]}" install --force-reinstall --no-deps "$("$root/.venv/bin/python" -c 'import importlib.metadata as m; print("onnxruntime-gpu==" + m.version("onnxruntime-gpu"))')"
  fi
elif "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
  log "replacing onnxruntime-gpu with onnxruntime (CPU flavour)"
  "${pip[@]}" uninstall -y onnxruntime-gpu onnxruntime >/dev/null 2>&1 || true
  "${pip[@]}" install -e "$root[test,openvino]"
fi
native=$("$root/scripts/build-native.sh" "$prefix" --python "$root/.venv/bin/python" | tail -1)
site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$prefix/python" "$native" > "$site/pycaffe.pth"
GLOG_minloglevel=2 "$root/.venv/bin/python" -c \
  'import hybrid_infer; from hybrid_infer.native import blob_access; blob_access()' \
  || { echo "setup.sh: .venv cannot import caffe and the native extension from $prefix, $native" >&2; exit 1; }
log "ready: pycaffe from $prefix; activate with 'source .venv/bin/activate'"
