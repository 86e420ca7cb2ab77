#!/usr/bin/env python3
"""The GPU's speed limit for the benchmark nets: PyTorch + cuDNN + CUDA graphs, FP32.

Runs torchvision's versions of the architectures that scripts/gpu_benchmark.py times
through hybrid_infer (random weights, eval mode, TF32 off so it is the same FP32 math),
each forward captured once in a CUDA graph and replayed: launch overhead gone, only the
kernels left. The medians are what a hand-written PyTorch deployment would get, so the
hybrid's GPU latency can be stated as a multiple of it. Needs torch and torchvision (the
GPU machine's own Python has them; hybrid_infer does not).

    python3 scripts/gpu_torch_limit.py --out results/gpu --batches 1 8
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torchvision

#: benchmark name -> torchvision constructor (MobileNet v1 is not in torchvision: v2 stands in)
ARCHITECTURES = {
    "ResNet-50": lambda: torchvision.models.resnet50(),
    "GoogLeNet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True),
    "AlexNet": lambda: torchvision.models.alexnet(),
    "SqueezeNet 1.1": lambda: torchvision.models.squeezenet1_1(),
    "MobileNet v2 (for v1)": lambda: torchvision.models.mobilenet_v2(),
}


def graphed_median_ms(model: torch.nn.Module, batch: int, repeats: int, warmup: int) -> float:
    """Median ms of one CUDA-graph replay (forward on a 3x224x224 batch), timed with CUDA events."""
    static_input = torch.randn(batch, 3, 224, 224, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmup):  # cuDNN picks its algorithms before capture
            model(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static_input)
    times = []
    for _ in range(warmup):
        graph.replay()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_torch_limit.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, dict[str, float]] = {}
    print(f"PyTorch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}; FP32, TF32 off, CUDA graphs")
    print(f"{'net':<24}" + "".join(f"{'b' + str(b) + ' ms':>10}" for b in args.batches))
    for name, make in ARCHITECTURES.items():
        model = make().cuda().eval()
        results[name] = {str(b): graphed_median_ms(model, b, args.repeats, args.warmup) for b in args.batches}
        print(f"{name:<24}" + "".join(f"{results[name][str(b)]:>10.3f}" for b in args.batches), flush=True)
        del model
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_torch_limit.json").write_text(json.dumps(
        {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "median_ms": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
