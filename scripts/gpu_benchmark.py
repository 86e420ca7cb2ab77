#!/usr/bin/env python
"""Caffe on the GPU: the baseline users have, and what a segment boundary costs there.

1. Pure Caffe on GPU --device, per model at each --batches: median of --repeats forwards
   (after warm-up) of the whole net, including the copy of its outputs to the host.
2. Hand-off cost per boundary: every Pooling layer is forced into its own segment and all
   segments run as Caffe GPU engines (``engine="caffe"``), so tensors cross real segment
   boundaries. The chain runs alternately with device-pointer hand-offs and with host-copy
   hand-offs (``zero_copy=False``: one copy down and one up per boundary); a segment's
   extra time on the host path is the cost of the hand-offs into it, because the
   executor times a segment from the moment it starts handing over its inputs.

3. With onnxruntime-gpu installed (``--engine onnxruntime-cuda``): per model and batch, in
   turns within one block so drift hits all alike: pure Caffe GPU; the hybrid with ONNX
   Runtime CUDA segments, with and without CUDA graphs (Caffe segments on the same GPU);
   the same net with a Python layer (HardSwish) inserted mid-network, which splits it into
   ORT CUDA -> Caffe GPU -> ORT CUDA; and ONNX Runtime CUDA on the whole model lowered as one
   ONNX graph (plain session, host inputs and outputs). Every hybrid is first checked against
   pure Caffe (relative L2 of the outputs and every Softmax input, 1e-4) and refused if off.

Random weights; writes gpu_benchmark.json under --out and prints tables.

    python scripts/gpu_benchmark.py --models-dir ../shared/models --out results/gpu
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import hybrid_infer
from hybrid_infer.analysis.timing import time_calls
from hybrid_infer.executor.hybrid_executor import DEVICE_POINTER

#: A hybrid further than this from pure Caffe (relative L2) is reported, not timed.
TOLERANCE = 1e-4

MODELS = {  # name: prototxt under --models-dir
    "ResNet-50": "resnet_50/ResNet-50-deploy.prototxt",
    "GoogLeNet": "bvlc_googlenet/deploy.prototxt",
    "AlexNet": "bvlc_alexnet/deploy.prototxt",
    "SqueezeNet 1.1": "squeezenet_v1.1/deploy.prototxt",
    "MobileNet v1": "mobilenet_v1/mobilenet_deploy.prototxt",
}


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    return time_calls(fn, repeats, warmup).median * 1e3


def random_inputs(net: hybrid_infer.HybridNet, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((batch, *shape[1:])).astype(np.float32)
            for name, shape in net.input_shapes().items()}


def pure_caffe(path: Path, batches: list[int], device: int, repeats: int) -> dict[int, float]:
    net = hybrid_infer.load(path, random_weights=1)
    return {batch: median_ms(lambda x=random_inputs(net, batch): net.run_caffe(x, device=device), repeats)
            for batch in batches}


def handoffs(path: Path, batch: int, device: int, repeats: int) -> dict[str, Any]:
    """Per-consumer-segment times with device-pointer and with host-copy hand-offs."""
    nets = {mode: hybrid_infer.load(path, random_weights=1, engine="caffe", fallback=["Pooling"],
                                    min_segment_size=1, device=device, zero_copy=mode == "device")
            for mode in ("device", "host")}
    x = random_inputs(nets["device"], batch)
    per_mode: dict[str, list[dict[int, float]]] = {"device": [], "host": []}
    totals: dict[str, list[float]] = {"device": [], "host": []}
    for round_ in range(repeats + 3):  # interleaved, so drift hits both paths alike
        for mode, net in nets.items():
            start = time.perf_counter()
            net.run(x)
            if round_ >= 3:
                totals[mode].append(time.perf_counter() - start)
                per_mode[mode].append(net.segment_times())
    net = nets["device"]
    boundaries = []
    for se in net.segment_engines:
        between = [h for h in net.handoffs() if h.target.startswith(f"segment {se.segment.id} ")
                   and h.path == DEVICE_POINTER]
        if not between:
            continue
        on = statistics.median(t[se.segment.id] for t in per_mode["device"]) * 1e3
        off = statistics.median(t[se.segment.id] for t in per_mode["host"]) * 1e3
        boundaries.append({"segment": se.segment.id, "values": [h.value for h in between],
                           "bytes": sum(h.nbytes for h in between),
                           "device_pointer_ms": round(on, 4), "host_copy_ms": round(off, 4),
                           "host_copy_extra_ms": round(off - on, 4)})
    for n in nets.values():
        n.close()
    return {"segments": len(net.partition.segments), "boundaries": boundaries,
            "total_device_pointer_ms": round(statistics.median(totals["device"]) * 1e3, 3),
            "total_host_copy_ms": round(statistics.median(totals["host"]) * 1e3, 3)}


def _checked(net: hybrid_infer.HybridNet, x: dict[str, np.ndarray]) -> tuple[float, str]:
    """Worst relative L2 against pure Caffe (outputs and Softmax inputs), and "" or why it is refused."""
    result = net.check(x, TOLERANCE)
    worst = max(row.rel_l2 for row in result.rows)
    return worst, "" if result.ok else f"refused: rel L2 {worst:.2g} > {TOLERANCE:g}"


def _whole_model_session(net: hybrid_infer.HybridNet, device: int) -> Callable[[dict[str, np.ndarray]], Any]:
    """ONNX Runtime CUDA on the whole net lowered as one graph: a plain session with its
    default settings (TF32 off, as for the hybrid), host arrays in and out."""
    import onnxruntime as ort
    from hybrid_infer.lowering.segment_to_onnx import lower_segment
    graph = net.graph
    onnx_model = lower_segment(graph, [layer.name for layer in graph.compute_layers()], graph.inputs,
                               list(net.checked_values()), net.model.weights, name="whole")
    session = ort.InferenceSession(onnx_model.SerializeToString(),
                                   providers=[("CUDAExecutionProvider", {"device_id": str(device), "use_tf32": "0"})])
    names = {graph.input_value(blob): blob for blob in net.input_blobs}
    return lambda x: session.run(None, {value: x[blob] for value, blob in names.items()})


def onnxruntime_cuda(path: Path, python_path: Path, batches: list[int], device: int, repeats: int,
                     rounds: int = 3) -> dict[str, Any]:
    """Pure Caffe GPU, the ORT CUDA hybrid (CUDA graphs on and off), the hybrid with a
    mid-network Python layer, and whole-model ORT CUDA: median ms per batch, in turns."""
    def load(prototxt: Path, **options: Any) -> hybrid_infer.HybridNet:
        return hybrid_infer.load(prototxt, random_weights=1, device=device, keep_logits=True, **options)
    variants = {"hybrid_ort_cuda": load(path, engine="onnxruntime-cuda"),
                "hybrid_ort_cuda_no_graphs": load(path, engine="onnxruntime-cuda", cuda_graphs=False),
                "hybrid_python_layer": load(python_path, engine="onnxruntime-cuda")}
    reference = variants["hybrid_ort_cuda"]
    result: dict[str, Any] = {"segments": {}, "rel_l2": {}, "refused": {}, "ms": {}, "notes": {}}
    for batch in batches:
        x = random_inputs(reference, batch)
        calls: dict[str, Callable[[], Any]] = {"caffe_gpu": lambda: reference.run_caffe(x, device=device)}
        for name, net in variants.items():
            worst, refusal = _checked(net, x)
            result["rel_l2"].setdefault(name, {})[str(batch)] = worst
            result["segments"][name] = " -> ".join(f"{se.engine.kind} {len(se.segment.layers)}"
                                                   for se in net.segment_engines)
            notes = [se.engine.cuda_graph_note for se in net.segment_engines
                     if getattr(se.engine, "cuda_graph_note", None)]
            if notes:
                result["notes"][name] = notes
            if refusal:
                result["refused"].setdefault(name, {})[str(batch)] = refusal
            else:
                calls[name] = lambda n=net: n.run(x)
        whole = _whole_model_session(reference, device)
        calls["ort_cuda_whole"] = lambda: whole(x)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):  # in turns: a slow spell of the machine hits every variant
            for name, call in calls.items():
                samples[name].append(median_ms(call, max(repeats // rounds, 5)))
        for name, values in samples.items():
            result["ms"].setdefault(name, {})[str(batch)] = round(min(values), 3)
    for net in variants.values():
        net.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-handoffs", action="store_true", help="leave out the Caffe-only hand-off tables")
    args = parser.parse_args()
    from hybrid_infer.engines.caffe_gpu_engine import use_gpu
    gpu = use_gpu(args.device)
    report: dict[str, Any] = {"gpu": gpu.name, "device": gpu.index, "host": platform.node(),
                              "repeats": args.repeats, "pure_caffe_gpu_ms": {}, "handoffs": {}}
    print(f"GPU {gpu.index}: {gpu.name}; medians of {args.repeats} runs, random weights\n")
    print("pure Caffe GPU (whole net, outputs copied to the host)")
    for name in args.models:
        times = pure_caffe(args.models_dir / MODELS[name], args.batches, args.device, args.repeats)
        report["pure_caffe_gpu_ms"][name] = {str(b): round(t, 3) for b, t in times.items()}
        print(f"  {name:<15}" + "".join(f"  batch {b}: {t:8.2f} ms" for b, t in times.items()), flush=True)
    from hybrid_infer.engines.onnxruntime_cuda_engine import runtime_available
    ok, why = runtime_available()
    if ok:
        import tempfile
        from bench_nets import with_python_layer
        print(f"\nONNX Runtime CUDA ({why}); ms, best of 3 medians taken in turns; x = pure Caffe GPU / this")
        report["onnxruntime_cuda"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                python_path, _ = with_python_layer(args.models_dir / MODELS[name], Path(tmp) / f"{name}.prototxt")
                r = onnxruntime_cuda(args.models_dir / MODELS[name], python_path, args.batches, args.device,
                                     args.repeats)
                report["onnxruntime_cuda"][name] = r
                for batch in map(str, args.batches):
                    caffe = r["ms"]["caffe_gpu"][batch]
                    cells = []
                    for key, label in (("hybrid_ort_cuda", "hybrid"), ("hybrid_ort_cuda_no_graphs", "no graphs"),
                                       ("hybrid_python_layer", "+Python layer"), ("ort_cuda_whole", "ORT whole")):
                        t = r["ms"].get(key, {}).get(batch)
                        cells.append(f"{label} {t:7.3f} ({caffe / t:4.1f}x)" if t else
                                     f"{label} {r['refused'].get(key, {}).get(batch, '-')}")
                    print(f"  {name:<15} b{batch}: Caffe {caffe:7.3f}  " + "  ".join(cells), flush=True)
                print(f"      segments: hybrid {r['segments']['hybrid_ort_cuda']}; with Python layer "
                      f"{r['segments']['hybrid_python_layer']}; worst rel L2 "
                      f"{max(v for d in r['rel_l2'].values() for v in d.values()):.2g}"
                      + (f"; {r['notes']}" if r["notes"] else ""), flush=True)
    else:
        print(f"\nONNX Runtime CUDA not measured: {why}")
    if not args.skip_handoffs:
        print("\nhand-offs between Caffe GPU segments (every Pooling layer its own segment)")
    for name in [] if args.skip_handoffs else args.models:
        for batch in args.batches:
            result = handoffs(args.models_dir / MODELS[name], batch, args.device, args.repeats)
            report["handoffs"].setdefault(name, {})[str(batch)] = result
            extra = [b["host_copy_extra_ms"] for b in result["boundaries"]]
            moved = sum(b["bytes"] for b in result["boundaries"])
            print(f"  {name:<15} batch {batch}: {result['segments']} segments, {len(extra)} boundaries, "
                  f"{moved / 2**20:.2f} MiB handed over; whole run {result['total_device_pointer_ms']:.2f} ms "
                  f"(device pointers) vs {result['total_host_copy_ms']:.2f} ms (host copies)", flush=True)
            for b in result["boundaries"]:
                print(f"      into segment {b['segment']:>3} {', '.join(b['values'])[:40]:<40} "
                      f"{b['bytes'] / 2**10:9.1f} KiB  pointer {b['device_pointer_ms']:7.3f} ms  "
                      f"host copy {b['host_copy_ms']:7.3f} ms  (+{b['host_copy_extra_ms']:.3f} ms)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out / 'gpu_benchmark.json'}")


if __name__ == "__main__":
    main()
