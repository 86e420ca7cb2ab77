#!/usr/bin/env python3
"""Apply the source patches the brocolli-caffe 9.0.2 sdist needs to build on Debian 12.

Each patch is a literal text replacement that must match exactly once, so a
changed upstream tree fails loudly here instead of producing a subtly broken
Caffe. Usage: patch_caffe.py SOURCE_DIR [--cuda]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def replace_once(path: Path, old: str, new: str, why: str) -> None:
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        sys.exit(f"patch_caffe: expected exactly one match in {path} for '{why}', found {count}")
    path.write_text(text.replace(old, new))
    print(f"  patched {path.name}: {why}")


def remove_stale_generated(src: Path) -> None:
    """The sdist ships protobuf code from an old protoc that fails against protobuf 3.21;
    it carries caffe.proto's mtime, so make would never regenerate it."""
    for rel in ("include/caffe/proto/caffe.pb.h", "src/caffe/proto/caffe.pb.cc",
                "python/caffe/proto/caffe_pb2.py"):
        (src / rel).unlink(missing_ok=True)
    for junk in [src / ".git", *src.glob("python/*.egg-info"), *src.rglob("__pycache__")]:
        if junk.is_dir():
            shutil.rmtree(junk)
    print("  removed stale generated protobuf files and sdist leftovers")


def patch_makefile(src: Path) -> None:
    mk = src / "Makefile"
    replace_once(mk, "BUILD_DIR = temp\n", "", "honour BUILD_DIR from Makefile.config")
    replace_once(mk, "$(BUILD_DIR)/%.o: %.cpp | $(ALL_BUILD_DIRS)",
                 "$(BUILD_DIR)/%.o: %.cpp $(PROTO_GEN_HEADER) | $(ALL_BUILD_DIRS)",
                 "objects wait for caffe.pb.h (make -j race)")


def patch_io_limits(src: Path) -> None:
    io_cpp = src / "src/caffe/util/io.cpp"
    text = io_cpp.read_text()
    if text.count("SetTotalBytesLimit(536870912)") != 2:
        sys.exit(f"patch_caffe: unexpected protobuf read limits in {io_cpp}")
    io_cpp.write_text(text.replace("SetTotalBytesLimit(536870912)", "SetTotalBytesLimit(2147483647)"))
    print("  patched io.cpp: protobuf read cap 512 MB -> 2 GB (VGG-sized caffemodels)")


def patch_lazy_image_imports(src: Path) -> None:
    """pycaffe imports scikit-image and scipy at import time only for its image helpers."""
    io_py = src / "python/caffe/io.py"
    replace_once(io_py, "import skimage.io\nfrom scipy.ndimage import zoom\n", "",
                 "drop eager scikit-image/scipy imports")
    replace_once(io_py, "def load_image(filename, color=True):\n",
                 "def load_image(filename, color=True):\n    import skimage, skimage.io\n",
                 "import scikit-image where load_image needs it")
    replace_once(io_py, "def resize_image(im, new_dims, interp_order=1):\n",
                 "def resize_image(im, new_dims, interp_order=1):\n"
                 "    import skimage.transform\n    from scipy.ndimage import zoom\n",
                 "import scikit-image/scipy where resize_image needs them")


def patch_cuda13(src: Path) -> None:
    """CUDA 13 removed cudaDeviceProp fields; the fork declares GPU methods it never defines."""
    common = src / "src/caffe/common.cpp"
    text = common.read_text()
    for field, attr in (("clockRate", "cudaDevAttrClockRate"),
                        ("deviceOverlap", "cudaDevAttrGpuOverlap"),
                        ("kernelExecTimeoutEnabled", "cudaDevAttrKernelExecTimeout")):
        old = f"prop.{field}"
        if old not in text:
            sys.exit(f"patch_caffe: {common} no longer uses {old}")
        text = text.replace(old, f"cuda_attribute({attr}, device)")
    helper = ("\n#ifndef CPU_ONLY\nstatic int cuda_attribute(cudaDeviceAttr attr, int device) {\n"
              "  int value = 0;\n  CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));\n"
              "  return value;\n}\n#endif\n")
    marker = "namespace caffe {\n"
    if text.count(marker) != 1:
        sys.exit(f"patch_caffe: cannot place helper in {common}")
    common.write_text(text.replace(marker, marker + helper))
    print("  patched common.cpp: device properties through cudaDeviceGetAttribute")

    proposal = src / "src/caffe/layers/proposal_layer.cu"
    replace_once(proposal, "INSTANTIATE_LAYER_GPU_FUNCS(ProposalLayer);",
                 "template <typename Dtype>\nvoid ProposalLayer<Dtype>::Backward_gpu(\n"
                 "    const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,\n"
                 "    const vector<Blob<Dtype>*>& bottom) {}\n\n"
                 "INSTANTIATE_LAYER_GPU_FUNCS(ProposalLayer);",
                 "define the declared no-op Backward_gpu")

    for header, cls in (("hardsigmoid_layer.hpp", "HardSigmoidLayer"),
                        ("hardswish_layer.hpp", "HardSwishLayer"),
                        ("maxunpool_layer.hpp", "MaxUnPoolLayer"),
                        ("pixelshuffle_layer.hpp", "PixelShuffleLayer"),
                        ("relu6_layer.hpp", "ReLU6Layer"),
                        ("upsample_layer.hpp", "UpsampleLayer")):
        cu = src / "src/caffe/layers" / header.replace("_layer.hpp", "_layer.cu")
        if cu.exists():
            continue
        cu.write_text(
            f'#include "caffe/layers/{header}"\n\nnamespace caffe {{\n\n'
            f"template <typename Dtype>\nvoid {cls}<Dtype>::Forward_gpu(const vector<Blob<Dtype>*>& bottom,\n"
            f"    const vector<Blob<Dtype>*>& top) {{\n  Forward_cpu(bottom, top);\n}}\n\n"
            f"template <typename Dtype>\nvoid {cls}<Dtype>::Backward_gpu(const vector<Blob<Dtype>*>& top,\n"
            f"    const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom) {{\n"
            f"  Backward_cpu(top, propagate_down, bottom);\n}}\n\n"
            f"INSTANTIATE_LAYER_GPU_FUNCS({cls});\n\n}}  // namespace caffe\n")
        print(f"  added {cu.name}: GPU methods that run the CPU code")


def patch_relu_gpu_host_copy(src: Path) -> None:
    """The fork's ReLU Forward_gpu reads its bottom with cpu_data() into an unused variable:
    a device-to-host copy of every ReLU input on every GPU forward, which also makes
    activations that never need the host look copied there."""
    replace_once(src / "src/caffe/layers/relu_layer.cu",
                 "  const Dtype* bottom_data_output = bottom[0]->cpu_data();\n", "",
                 "drop the stray host copy in ReLU's Forward_gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    remove_stale_generated(args.source)
    patch_makefile(args.source)
    patch_io_limits(args.source)
    patch_lazy_image_imports(args.source)
    if args.cuda:
        patch_cuda13(args.source)
        patch_relu_gpu_host_copy(args.source)


if __name__ == "__main__":
    main()
