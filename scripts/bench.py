#!/usr/bin/env python
"""Benchmark hybrid_infer against the tools a user would otherwise pick, on this machine's CPU.

For each model, batch size and variant (as published, and with a Python layer inserted
mid-network) it times, each in blocks of its own after warm-up (the better of two blocks):

- pure Caffe (pycaffe, CPU),
- OpenCV DNN (cv2.dnn.readNetFromCaffe; it cannot run Caffe Python layers),
- ONNX Runtime and OpenVINO (FP32, and BF16 where the CPU has avx512_bf16 or AMX) on the
  whole model lowered as one ONNX graph (impossible once a Python layer is in the net),
- hybrid_infer (default partition) with each CPU engine for the TensorRT segments, and
  with ``--engine auto`` (the faster engine per segment, measured in this run: the engine
  cache is a fresh folder).

The SSD detectors (MobileNet-SSD, HyperLPR's plate detector; as published only) are also
timed with their DetectionOutput forced to Caffe (``hybrid_before``: how hybrid_infer ran them
before DetectionOutput was lowered), and their outputs are compared as detections
(``hybrid_infer.detections``): differences that near-equal scores explain are allowed.

Every runtime's outputs (and pre-softmax logits: softmax of random logits saturates and
hides errors) are checked against Caffe first; one beyond --tolerance is refused, not
timed (BF16, reduced precision, is held to --bf16-tolerance and its error is reported). Also measured: load + partition time of a generated ResNet-152, peak resident
memory of hybrid vs Caffe (separate processes), and RSS over a 10,000-call soak of ``run``.
Writes bench.json, bench.md and bench.png under --out. Random weights throughout.

    .venv/bin/python scripts/bench.py            # everything (about 10 minutes on 2 cores)
    .venv/bin/python scripts/bench.py --models alexnet --batches 1 --skip-extras
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "graphs" / "python_layers"),
                                                         os.environ.get("PYTHONPATH", "")]))
sys.path.insert(0, str(REPO / "graphs" / "python_layers"))
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

from bench_nets import resnet_prototxt, with_python_layer  # noqa: E402
from hybrid_infer.analysis.layer_diff import Settings, hybrid_values  # noqa: E402
from hybrid_infer.analysis.timing import Timing, time_calls  # noqa: E402
from hybrid_infer.api import HybridNet  # noqa: E402
from hybrid_infer.detections import detection_outputs  # noqa: E402
from hybrid_infer.metrics import compare_outputs  # noqa: E402
from hybrid_infer.engines import host_cpu  # noqa: E402
from hybrid_infer.engines.engine_cache import EngineCache  # noqa: E402
from hybrid_infer.model.caffe_model import CaffeModel  # noqa: E402
from hybrid_infer.partition.partitioner import CAFFE  # noqa: E402
from hybrid_infer.report.bar_chart import grouped_bar_chart  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
MODELS = {
    "googlenet": "bvlc_googlenet/deploy.prototxt",
    "resnet50": "resnet_50/ResNet-50-deploy.prototxt",
    "squeezenet1.1": "squeezenet_v1.1/deploy.prototxt",
    "mobilenet_v1": "mobilenet_v1/mobilenet_deploy.prototxt",
    "alexnet": "bvlc_alexnet/deploy.prototxt",
    "mobilenet_ssd": "mobilenet_ssd/MobileNetSSD_deploy.prototxt",
    "hyperlpr_ssd": "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
}
#: Detectors: timed as published only, with DetectionOutput in Caffe too (hybrid_before).
SSD_MODELS = ("mobilenet_ssd", "hyperlpr_ssd")
#: hybrid_infer with each engine for its TensorRT segments; "hybrid" is the default, auto.
HYBRIDS = {"hybrid_onnxruntime": "onnxruntime", "hybrid_openvino": "openvino", "hybrid": "auto"}
#: Whole-model FP32 runtimes: what ``--engine auto``'s hybrid must keep up with (within 5%).
FP32_ENGINES = ("opencv", "ort_whole", "ov_whole")
#: Reduced-precision runtimes: held to --bf16-tolerance instead of --tolerance.
REDUCED = ("ov_whole_bf16",)
RUNTIME_NAMES = {"caffe": "Caffe", "opencv": "OpenCV DNN", "ort_whole": "ORT whole", "ov_whole": "OpenVINO whole",
                 "ov_whole_bf16": "OpenVINO BF16 whole", "hybrid_onnxruntime": "hybrid ORT",
                 "hybrid_openvino": "hybrid OpenVINO", "hybrid": "hybrid auto",
                 "hybrid_before": "hybrid, DetectionOutput in Caffe"}
BUSY = "make|nvcc|cc1plus"
#: Other processes may use at most this many cores during a measurement, else it is repeated.
QUIET = 0.1
#: Pause after each timed block, for the worker threads of what was timed to go to sleep.
SETTLE_S = 1.0
#: Every runtime is timed in this many blocks (--blocks); the best block counts.
BLOCKS = 2


@dataclass
class Measured:
    """One runtime on one case: a timing, or why there is none."""
    timing: Optional[Timing] = None
    status: str = "ok"
    rel_l2: Optional[float] = None


@dataclass
class Case:
    model: str
    variant: str  # "base" or "python"
    batch: int
    results: dict[str, Measured] = field(default_factory=dict)
    segments: str = ""
    #: SSD nets: the segments with DetectionOutput forced to Caffe.
    segments_before: str = ""
    auto_choice: str = ""  # the engine auto chose for each TensorRT segment
    handoff: Optional[dict[str, float]] = None
    others_cpu: float = 0.0  # cores' worth of CPU other processes used while this case was timed


def busy_processes() -> list[str]:
    found = subprocess.run(["pgrep", "-a", BUSY], capture_output=True, text=True).stdout.strip()
    return found.splitlines() if found else []


def others_cpu_seconds() -> float:
    """CPU seconds used so far by every other process (and their finished children)."""
    me, total = os.getpid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def others_share(seconds: float = 2.0) -> float:
    """Cores' worth of CPU other processes use, sampled over ``seconds``."""
    before = others_cpu_seconds()
    time.sleep(seconds)
    return (others_cpu_seconds() - before) / seconds


def wait_until_quiet(limit_s: float) -> bool:
    """Wait (at most ``limit_s``) while a build runs or other processes use more than a tenth of
    a core: they would take cores from the timings on this 2-core machine."""
    deadline = time.monotonic() + limit_s
    while busy_processes() or others_share() > QUIET:
        if time.monotonic() > deadline:
            return False
        print(f"waiting for a quiet machine ({len(busy_processes())} build process(es))", file=sys.stderr)
        time.sleep(15)
    return True


def worst_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray], net: HybridNet,
                tolerance: float) -> tuple[float, str]:
    """The worst relative L2 against Caffe's outputs (DetectionOutput blobs: over the matched
    detections), and why it is refused ("" when every output is within ``tolerance``; for
    detections: no difference that near-equal scores fail to explain)."""
    got = {name: got[name] if name in detection_outputs(net.graph) else got[name].reshape(want[name].shape)
           for name in want}
    rows = compare_outputs(got, want, detections=detection_outputs(net.graph), tolerance=tolerance)
    error = max(r.rel_l2 for r in rows)
    refused = [r for r in rows if not r.within(tolerance)]
    if not refused:
        return error, ""
    found = next((r.detections for r in refused if r.detections is not None), None)
    if found is not None:
        return error, (f"refused: {len(found.real)} detection difference(s) beyond {tolerance:g}, "
                       f"max abs {found.max_abs:.2g}")
    return error, f"refused: rel L2 {error:.2g} > {tolerance:g}"


def caffe_row_order(detections: np.ndarray) -> np.ndarray:
    """DetectionOutput rows in Caffe's order (image, label, then descending score); OpenCV DNN
    orders each image's rows by score across labels."""
    rows = detections.reshape(-1, 7)
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))].reshape(detections.shape)


def _segments(net: HybridNet) -> str:
    return " → ".join(f"{'trt' if s.backend != CAFFE else 'caffe'} {len(s.layers)}" for s in net.partition.segments)


def opencv_runner(model: CaffeModel, net: HybridNet, blobs: list[str], workdir: Path,
                  inputs: dict[str, np.ndarray]) -> Callable[[], dict[str, np.ndarray]]:
    import cv2
    weights = workdir / "opencv.caffemodel"
    model.reference_net().save(str(weights))
    cv_net = cv2.dnn.readNetFromCaffe(str(model.normalised_prototxt), str(weights))
    # OpenCV names outputs by layer; each checked blob is its producing layer's only top here.
    layer_names = [net.graph.values[net.graph.value_of_blob(b)].producer for b in blobs]
    (name, array), = inputs.items()
    detections = detection_outputs(net.graph)

    def run() -> dict[str, np.ndarray]:
        cv_net.setInput(array, name)
        out = dict(zip(blobs, cv_net.forward(layer_names)))
        return {b: caffe_row_order(a) if b in detections else a for b, a in out.items()}
    return run


def whole_model_runners(model: CaffeModel, net: HybridNet, blobs: list[str], inputs: dict[str, np.ndarray],
                        bf16: bool) -> dict[str, Callable[[], dict[str, np.ndarray]]]:
    """The whole net as one ONNX graph, in a default ONNX Runtime session and in OpenVINO
    (FP32 set explicitly; BF16 too when ``bf16``): what exporting the model and running it
    with either would give, if every layer could be lowered."""
    import onnxruntime as ort
    from hybrid_infer.engines.openvino_engine import OpenVinoEngine
    from hybrid_infer.lowering.segment_to_onnx import lower_segment
    graph = net.graph
    values = [graph.value_of_blob(b) for b in blobs]
    onnx_model = lower_segment(graph, [layer.name for layer in graph.compute_layers()], graph.inputs,
                               values, model.weights)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {v: inputs[graph.values[v].blob] for v in graph.inputs}
    runners = {"ort_whole": lambda: dict(zip(blobs, session.run(values, feeds)))}
    for name, precision in (("ov_whole", "f32"), ("ov_whole_bf16", "bf16"))[:2 if bf16 else 1]:
        runners[name] = _named_outputs(OpenVinoEngine(onnx_model, precision=precision), feeds, dict(zip(values, blobs)))
    return runners


def _named_outputs(engine: Any, feeds: dict[str, np.ndarray],
                   blob_of: dict[str, str]) -> Callable[[], dict[str, np.ndarray]]:
    """One run of ``engine`` per call, its outputs renamed from value ids to blobs."""
    def run() -> dict[str, np.ndarray]:
        outputs = engine.run(feeds)
        return {blob: outputs[value] for value, blob in blob_of.items()}
    return run


def timed_blocks(calls: dict[str, Callable[[], Any]], runs: int, warmup: int, blocks: int = BLOCKS) -> dict[str, Timing]:
    """Each call warmed up and timed in a block of its own, with a pause after each block, all
    blocks ``blocks`` times; each call keeps its best block. Not interleaved call by call: ONNX Runtime,
    OpenBLAS and OpenCV keep worker threads busy after a call, which takes a core from
    whatever runs next on 2 cores; and one block can still be caught by such an after-effect
    (SqueezeNet's ORT measured 6 ms in one block and 4 ms in the next)."""
    best: dict[str, Timing] = {}
    for _ in range(blocks):
        for name, call in calls.items():
            timing = time_calls(call, runs, warmup)
            if name not in best or timing.median < best[name].median:
                best[name] = timing
            time.sleep(SETTLE_S)
    return best


def measure_case(case: Case, prototxt: Path, args: argparse.Namespace, workdir: Path) -> None:
    model = CaffeModel(prototxt, input_shapes={"data": _input_shape(prototxt, case.batch)})
    model.set_random_weights(args.seed)
    blobs = HybridNet(model, engine="onnxruntime").outputs_with_logits()
    # A fresh engine cache: auto measures its engines in this run, as on a user's first run.
    cache = EngineCache(workdir / f"engines-{case.model}-{case.variant}-{case.batch}")
    hybrids = {name: HybridNet(model, engine=engine, outputs=blobs, engine_cache=cache)
               for name, engine in HYBRIDS.items()}
    net = hybrids["hybrid"]
    inputs = {name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)
              for name, shape in net.input_shapes().items()}
    reference = net.run_caffe(inputs)
    case.segments = _segments(net)
    candidates: dict[str, Callable[[], dict[str, np.ndarray]]] = {"caffe": lambda: net.run_caffe(inputs)}
    before = None
    if case.model in SSD_MODELS:
        before = HybridNet(model, engine="onnxruntime", outputs=blobs, fallback=["DetectionOutput"])
        case.segments_before = _segments(before)
        candidates["hybrid_before"] = lambda: before.run(inputs)
    has_python = any(layer.type == "Python" for layer in net.graph.layers.values())
    whole = ["ort_whole", "ov_whole"] + (["ov_whole_bf16"] if args.bf16 else [])
    if has_python:
        for name in ("opencv", *whole):
            case.results[name] = Measured(status="n/a (Python layer)")
    else:
        candidates.update(whole_model_runners(model, net, blobs, inputs, args.bf16))
    for name, hybrid in hybrids.items():
        candidates[name] = lambda h=hybrid: h.run(inputs)
    if not has_python:
        # Last: OpenCV's worker threads stay busy after its calls and slowed ONNX Runtime's
        # block right after it once (MobileNet 8.1 ms against 5.9 ms).
        candidates["opencv"] = opencv_runner(model, net, blobs, workdir, inputs)
    timed: dict[str, Callable[[], Any]] = {}
    for name, call in candidates.items():
        error, refusal = worst_error(call(), reference, net,
                                     args.bf16_tolerance if name in REDUCED else args.tolerance)
        if refusal:
            case.results[name] = Measured(status=refusal, rel_l2=error)
        else:
            case.results[name] = Measured(rel_l2=error)
            timed[name] = call
    case.auto_choice = ", ".join(se.engine.kind for se in net.segment_engines if se.segment.backend != CAFFE)
    if has_python and "hybrid" in timed:
        timed.update(_segment_calls(net, inputs))
    timings = timed_blocks(timed, args.runs, args.warmup, args.blocks)
    for name, timing in timings.items():
        if name in case.results:
            case.results[name].timing = timing
    if has_python and "hybrid" in timings:
        total = timings["hybrid"].median
        parts = sum(t.median for n, t in timings.items() if n.startswith("segment"))
        case.handoff = {"hybrid_ms": total * 1e3, "segments_alone_ms": parts * 1e3,
                        "overhead_ms": (total - parts) * 1e3, "overhead_share": (total - parts) / total,
                        "executor_outside_engines_ms": _outside_engines(net, inputs, args.runs) * 1e3,
                        **{f"{n}_ms": t.median * 1e3 for n, t in timings.items() if n.startswith("segment")}}
    for hybrid in hybrids.values():
        hybrid.close()
    if before is not None:
        before.close()


def _outside_engines(net: HybridNet, inputs: dict[str, np.ndarray], runs: int) -> float:
    """Median time of a hybrid run not spent inside a segment's engine (the executor's own work)."""
    outside = []
    for _ in range(runs):
        start = time.perf_counter()
        net.run(inputs)
        outside.append(time.perf_counter() - start - sum(net.segment_times().values()))
    return float(np.median(outside))


def _segment_calls(net: HybridNet, inputs: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
    """Each segment's engine alone on ready inputs: what the hybrid costs without its hand-offs."""
    engines = net.segment_engines
    boundary = [v for se in engines for v in se.segment.inputs if v not in net.graph.inputs]
    values, _, _, _ = hybrid_values(net, Settings(engine="onnxruntime"), inputs, boundary)
    values.update({net.graph.input_value(k): v for k, v in net.check_inputs(inputs).items()})
    calls = {}
    for se in engines:
        feeds = {v: values[v] for v in se.segment.inputs}
        calls[f"segment{se.segment.id}_{se.engine.kind}"] = (lambda e=se.engine, f=feeds: e.run(f))
    return calls


def _input_shape(prototxt: Path, batch: int) -> tuple[int, ...]:
    shape = CaffeModel(prototxt).info.blob_shapes["data"]
    return (batch, *shape[1:])


def load_time(workdir: Path, runs: int) -> dict[str, Any]:
    """hybrid_infer.load of a generated ResNet-152: prototxt only, and with a caffemodel."""
    import hybrid_infer
    prototxt = workdir / "resnet152.prototxt"
    prototxt.write_text(resnet_prototxt())
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        net = hybrid_infer.load(prototxt)
        samples.append(time.perf_counter() - start)
    layers = len(net.graph.layers)
    model = CaffeModel(prototxt)
    model.set_random_weights(0)
    weights = workdir / "resnet152.caffemodel"
    model.reference_net().save(str(weights))
    with_weights = []
    for _ in range(max(1, runs // 2)):
        start = time.perf_counter()
        hybrid_infer.load(prototxt, weights)
        with_weights.append(time.perf_counter() - start)
    return {"layers": layers, "segments": len(net.partition.segments),
            "load_partition_s": float(np.median(samples)), "samples_s": samples,
            "caffemodel_mib": weights.stat().st_size / 2**20,
            "load_partition_with_caffemodel_s": float(np.median(with_weights))}


PEAK_RSS_CHILD = r"""
import os, sys
os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np
kind, prototxt, weights = sys.argv[1:4]
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
if kind == "caffe":
    import caffe
    caffe.set_mode_cpu()
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    for _ in range(10):
        net.blobs["data"].data[...] = x
        net.forward()
else:
    import hybrid_infer
    net = hybrid_infer.load(prototxt, weights, engine="onnxruntime")
    for _ in range(10):
        net.run({"data": x})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent across exec.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak_rss(workdir: Path, model_name: str) -> dict[str, Any]:
    """Peak RSS of pure Caffe and of hybrid_infer running the same model and weights, each in a
    fresh process (the hybrid's includes Caffe reading the weights, which it does at load)."""
    prototxt = SHARED / MODELS[model_name]
    model = CaffeModel(prototxt)
    model.set_random_weights(0)
    weights = workdir / f"{model_name}.caffemodel"
    model.reference_net().save(str(weights))
    out = {}
    for kind in ("caffe", "hybrid"):
        done = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, kind, str(model.normalised_prototxt),
                               str(weights)], capture_output=True, text=True, check=True)
        out[f"{kind}_mib"] = int(done.stdout.strip().splitlines()[-1]) / 1024
    out["ratio"] = out["hybrid_mib"] / out["caffe_mib"]
    out["model"] = model_name
    out["caffemodel_mib"] = weights.stat().st_size / 2**20
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(calls: int) -> dict[str, Any]:
    """``run`` called ``calls`` times on the bundled TensorRT | Caffe (Python) | TensorRT net."""
    import hybrid_infer
    net = hybrid_infer.load(REPO / "graphs/python_layer_net/deploy.prototxt", random_weights=3,
                            engine="onnxruntime")
    x = {"data": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    trace = []
    start = time.perf_counter()
    for i in range(1, calls + 1):
        net.run(x)
        if i % 1000 == 0:
            trace.append({"calls": i, "rss_mib": round(rss_mib(), 2)})
            print(f"  soak: {i:6d} calls, RSS {trace[-1]['rss_mib']:.1f} MiB", file=sys.stderr)
    elapsed = time.perf_counter() - start
    return {"net": "graphs/python_layer_net", "segments": [s.backend for s in net.partition.segments],
            "calls": calls, "seconds": elapsed, "rss_trace": trace,
            "growth_after_first_1000_mib": trace[-1]["rss_mib"] - trace[0]["rss_mib"] if trace else 0.0}


def soak_in_fresh_process(calls: int) -> dict[str, Any]:
    """The soak in a process of its own, so its RSS is the small net's and not the benchmark's."""
    done = subprocess.run([sys.executable, __file__, "--soak-child", "--soak-calls", str(calls)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def ratios(cases: list[Case]) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        t = {k: m.timing.median for k, m in c.results.items() if m.timing is not None}
        if "hybrid" not in t:
            continue
        row: dict[str, Any] = {"model": c.model, "variant": c.variant, "batch": c.batch}
        if "opencv" in t:
            row["opencv_over_hybrid"] = t["opencv"] / t["hybrid"]
        if "caffe" in t:
            row["caffe_over_hybrid"] = t["caffe"] / t["hybrid"]
        if "ort_whole" in t and "caffe" not in c.segments:
            row["hybrid_over_ort_whole"] = t["hybrid"] / t["ort_whole"]
        fastest = min((k for k in FP32_ENGINES if k in t), key=t.get, default=None)
        if fastest:
            row["fastest_fp32"], row["hybrid_over_fastest_fp32"] = fastest, t["hybrid"] / t[fastest]
        single = [t[k] for k in HYBRIDS if k != "hybrid" and k in t]
        if single:
            row["hybrid_over_best_single_engine_hybrid"] = t["hybrid"] / min(single)
        if c.handoff:
            row["handoff_share"] = c.handoff["overhead_share"]
            row["executor_share"] = c.handoff["executor_outside_engines_ms"] / c.handoff["hybrid_ms"]
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]], load: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures that decide it."""
    base = [r for r in rows if r["variant"] == "base" and r["model"] not in SSD_MODELS]
    out = []
    for r in base:
        if "opencv_over_hybrid" in r:
            out.append({"target": "faster than OpenCV DNN", "case": f"{r['model']} b{r['batch']}",
                        "value": r["opencv_over_hybrid"], "met": r["opencv_over_hybrid"] > 1})
    for r in base:
        if r["batch"] == 1 and r["model"] in ("resnet50", "googlenet", "mobilenet_v1"):
            out.append({"target": ">= 2x faster than Caffe at batch 1", "case": r["model"],
                        "value": r["caffe_over_hybrid"], "met": r["caffe_over_hybrid"] >= 2})
    for r in base:
        if "hybrid_over_ort_whole" in r:
            out.append({"target": "within 10% of whole-model ORT", "case": f"{r['model']} b{r['batch']}",
                        "value": r["hybrid_over_ort_whole"], "met": r["hybrid_over_ort_whole"] <= 1.10})
    for r in base:
        if "hybrid_over_fastest_fp32" in r:
            out.append({"target": "auto within 5% of the fastest FP32 engine", "case": f"{r['model']} b{r['batch']}",
                        "value": r["hybrid_over_fastest_fp32"], "versus": RUNTIME_NAMES[r["fastest_fp32"]],
                        "met": r["hybrid_over_fastest_fp32"] <= 1.05})
    for r in rows:
        if r["variant"] == "python" and "hybrid_over_best_single_engine_hybrid" in r:
            out.append({"target": "auto within 5% of the faster single-engine hybrid",
                        "case": f"{r['model']} + Python b{r['batch']}",
                        "value": r["hybrid_over_best_single_engine_hybrid"],
                        "met": r["hybrid_over_best_single_engine_hybrid"] <= 1.05})
    for r in rows:
        if "handoff_share" in r:
            out.append({"target": "hand-off < 5% with a Python layer", "case": f"{r['model']} b{r['batch']}",
                        "value": r["handoff_share"], "executor_share": r["executor_share"],
                        "met": r["handoff_share"] < 0.05})
    if load:
        out.append({"target": "load + partition ResNet-152 < 1 s", "case": "prototxt",
                    "value": load["load_partition_s"], "met": load["load_partition_s"] < 1})
    return out


def ssd_markdown(cases: list[Case]) -> list[str]:
    """The detectors' table: DetectionOutput in Caffe (before) against lowered (after)."""
    rows = [c for c in cases if c.model in SSD_MODELS]
    if not rows:
        return []
    lines = ["", "SSD detectors (DetectionOutput lowered vs forced to Caffe), same run, ms:", "",
             "| model | batch | Caffe | OpenCV DNN | hybrid before | hybrid after | after vs before | after vs Caffe "
             "| after vs OpenCV | segments before → after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        t = {k: m.timing.median for k, m in c.results.items() if m.timing}
        cell = lambda k: f"{t[k] * 1e3:.1f}" if k in t else (c.results[k].status if k in c.results else "-")
        vs = lambda k: f"{t[k] / t['hybrid']:.2f}x" if k in t and "hybrid" in t else "-"
        lines.append(f"| {c.model} | {c.batch} | {cell('caffe')} | {cell('opencv')} | {cell('hybrid_before')} | "
                     f"{cell('hybrid')} | {vs('hybrid_before')} | {vs('caffe')} | {vs('opencv')} | "
                     f"{c.segments_before} ⇒ {c.segments} |")
    return lines


def markdown(cases: list[Case], meta: dict[str, Any], extras: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    columns = [k for k in RUNTIME_NAMES if any(k in c.results for c in cases)]
    lines = [f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), one run of "
             f"`scripts/bench.py`; median of {meta['runs']} runs after {meta['warmup']} warm-up (best of "
             f"{meta['blocks']} blocks), in ms (lower is better); random weights; ONNX Runtime {meta['onnxruntime']}, "
             f"OpenVINO {meta['openvino']}, OpenCV {meta['opencv']}.", "",
             f"CPU: {meta['cpu_line']}. Other processes used {meta['others_cpu_mean']:.2f} cores on average "
             "while the cases were measured" + (" (a shared machine: expect noise)" if meta["others_cpu_mean"] > QUIET
                                                else "") + ".", "",
             "| model | batch | " + " | ".join(RUNTIME_NAMES[k] for k in columns)
             + " | auto chose | auto vs fastest FP32 | hybrid auto vs Caffe | segments |",
             "|---|---|" + "---|" * (len(columns) + 4)]
    for c in (c for c in cases if c.model not in SSD_MODELS):
        def cell(name: str) -> str:
            m = c.results.get(name)
            if m is None:
                return "-"
            if not m.timing:
                return m.status
            return f"{m.timing.median * 1e3:.1f}" + (f" (rel L2 {m.rel_l2:.1g})" if name in REDUCED else "")
        t = {k: m.timing.median for k, m in c.results.items() if m.timing}
        fastest = min((k for k in FP32_ENGINES if k in t), key=t.get, default=None)
        versus = (f"{t['hybrid'] / t[fastest]:.2f}x ({RUNTIME_NAMES[fastest]})" if fastest and "hybrid" in t
                  else "-")
        label = c.model + (" + Python layer" if c.variant == "python" else "")
        caffe = f"{t['caffe'] / t['hybrid']:.2f}x" if "caffe" in t and "hybrid" in t else "-"
        lines.append(f"| {label} | {c.batch} | " + " | ".join(cell(k) for k in columns)
                     + f" | {c.auto_choice} | {versus} | {caffe} | {c.segments} |")
    lines += ssd_markdown(cases)
    lines += ["", "n/a (Python layer): OpenCV DNN cannot run Caffe Python layers, and a Python layer cannot "
                  "be lowered to ONNX. hybrid ORT / OpenVINO / auto: hybrid_infer with that engine for the "
                  "TensorRT segments (auto: the faster per segment, measured at the first run of this benchmark; "
                  "its choice per segment in 'auto chose'). OpenVINO BF16 computes in BF16 (reduced precision; "
                  "its error against Caffe in brackets). Segments: layers per segment in execution order (trt: "
                  "lowered to ONNX; caffe: pycaffe). Fastest FP32: the fastest of OpenCV DNN and the "
                  "whole-model ORT and OpenVINO."]
    lines += ["", "Ratios: OpenCV DNN or Caffe latency over hybrid_infer's (above 1: hybrid_infer is faster), "
                  "hybrid_infer's (auto) over whole-model ORT's or the fastest FP32 engine's (at most 1.10 / "
                  "1.05 is within 10% / 5%). Hand-off: hybrid latency minus the sum of its segments' engines "
                  "timed alone on ready inputs, as a share of hybrid latency; in brackets the part spent "
                  "outside the engines during the hybrid run itself.",
              "", "| target | case | measured | met |", "|---|---|---|---|"]
    for g in goals:
        value = (f"{g['value']:.1%} (executor alone {g['executor_share']:.1%})" if "hand-off" in g["target"]
                 else f"{g['value']:.3f} s" if "load" in g["target"] else f"{g['value']:.2f}x")
        value += f" (vs {g['versus']})" if "versus" in g else ""
        lines.append(f"| {g['target']} | {g['case']} | {value} | {'yes' if g['met'] else '**no**'} |")
    if "load" in extras:
        ld = extras["load"]
        lines += ["", f"Load + partition of a generated ResNet-152 ({ld['layers']} layers): "
                      f"{ld['load_partition_s']:.3f} s from the prototxt; {ld['load_partition_with_caffemodel_s']:.2f} s "
                      f"with its {ld['caffemodel_mib']:.0f} MiB caffemodel."]
    if "peak_rss" in extras:
        pr = extras["peak_rss"]
        lines.append(f"Peak RSS running {pr['model']} (batch 1, {pr['caffemodel_mib']:.0f} MiB weights): "
                     f"Caffe {pr['caffe_mib']:.0f} MiB, hybrid_infer {pr['hybrid_mib']:.0f} MiB ({pr['ratio']:.2f}x).")
    if "soak" in extras:
        sk = extras["soak"]
        trace = ", ".join(f"{p['rss_mib']:.1f}" for p in sk["rss_trace"])
        lines.append(f"Soak: {sk['calls']} calls of `run` on {sk['net']} ({' | '.join(sk['segments'])}) in "
                     f"{sk['seconds']:.1f} s; RSS every 1000 calls (MiB): {trace}.")
    return "\n".join(lines) + "\n"


def chart(cases: list[Case], path: Path, meta: dict[str, Any]) -> None:
    groups = [f"{c.model}{'+py' if c.variant == 'python' else ''}\nb{c.batch}" for c in cases]
    series: dict[str, list[Optional[float]]] = {}
    names = {"opencv": "OpenCV DNN", "ort_whole": "ORT whole model", "ov_whole": "OpenVINO whole model",
             "hybrid": "hybrid_infer (auto)"}
    for key, label in names.items():
        series[label] = []
        for c in cases:
            m, base = c.results.get(key), c.results.get("caffe")
            ok = m and m.timing and base and base.timing
            series[label].append(base.timing.median / m.timing.median if ok else None)
    grouped_bar_chart(path, groups, series, title=f"Speed-up over pure Caffe (higher is better; Caffe = 1), "
                                                  f"{meta['cpu']}, {meta['cores']} cores",
                      ylabel="x faster than Caffe (median latency)",
                      colours={"OpenCV DNN": "#5b8def", "ORT whole model": "#999999",
                               "OpenVINO whole model": "#6f42c1", "hybrid_infer (auto)": "#76b900"},
                      note="n/a: OpenCV DNN cannot run Python layers; a Python layer cannot be lowered to ONNX")


def machine() -> dict[str, Any]:
    import cv2
    import onnxruntime
    from hybrid_infer.engines.openvino_engine import version as openvino_version
    return {"cpu": host_cpu.cpu_model(), "cores": os.cpu_count(), "cpu_line": host_cpu.describe(),
            "cpu_features": host_cpu.cpu_features(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "openvino": openvino_version(), "opencv": cv2.__version__,
            "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["base", "python"], choices=["base", "python"])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative L2 against Caffe (1e-4)")
    parser.add_argument("--bf16-tolerance", type=float, default=5e-2,
                        help="relative L2 against Caffe for BF16 runtimes (reduced precision; 5e-2)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                        help="skip OpenVINO BF16 (default: measured where the CPU has avx512_bf16 or AMX)")
    parser.add_argument("--blocks", type=int, default=BLOCKS, help=f"timed blocks per runtime, best counts ({BLOCKS})")
    parser.add_argument("--attempts", type=int, default=3,
                        help="measure a case again, up to this many times in all, while other processes used "
                             f"more than {QUIET} cores (3)")
    parser.add_argument("--soak-calls", type=int, default=10_000)
    parser.add_argument("--skip-extras", action="store_true", help="only the latency table")
    parser.add_argument("--precision-models", nargs="*", default=["resnet50", "googlenet"], choices=list(MODELS),
                        help="models for the FP16/INT8 rows (none: skip them)")
    parser.add_argument("--wait-quiet", type=float, default=900,
                        help="seconds to wait for running builds to finish before timing (900)")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--soak-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.soak_child:
        print(json.dumps(soak(args.soak_calls)))
        return 0
    from tqdm import tqdm
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: the benchmark models are not available here", file=sys.stderr)
        return 2
    if args.bf16 is None:
        from hybrid_infer.engines.openvino_engine import bf16_supported
        args.bf16 = bf16_supported()
    quiet = wait_until_quiet(args.wait_quiet)
    if not quiet:
        print("warning: build processes still running; timings will be disturbed", file=sys.stderr)
    meta = {**machine(), "runs": args.runs, "warmup": args.warmup, "seed": args.seed,
            "tolerance_rel_l2": args.tolerance, "bf16_tolerance_rel_l2": args.bf16_tolerance, "bf16": args.bf16,
            "blocks": args.blocks}
    cases = [Case(m, v, b) for m in args.models for v in args.variants for b in args.batches
             if v == "base" or m not in SSD_MODELS]
    extras: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hybrid_bench_") as tmp:
        workdir = Path(tmp)
        for case in tqdm(cases, desc="latency", unit="case"):
            prototxt = SHARED / MODELS[case.model]
            if case.variant == "python":
                prototxt, _ = with_python_layer(prototxt, workdir / f"{case.model}_python.prototxt")
            for attempt in range(args.attempts):
                quiet &= wait_until_quiet(args.wait_quiet)
                before, start = others_cpu_seconds(), time.monotonic()
                case.results, case.handoff = {}, None
                measure_case(case, prototxt, args, workdir)
                case.others_cpu = (others_cpu_seconds() - before) / (time.monotonic() - start)
                if case.others_cpu <= QUIET or attempt + 1 == args.attempts:
                    break
                tqdm.write(f"{case.model} {case.variant} b{case.batch}: other processes used "
                           f"{case.others_cpu:.2f} cores meanwhile; measuring again")
        if args.precision_models:
            import bench_precision
            extras["cpu_features"] = bench_precision.cpu_features()
            extras["precision"] = {}
            for name in tqdm(args.precision_models, desc="precision", unit="model"):
                for batch in args.batches:
                    prototxt = SHARED / MODELS[name]
                    extras["precision"][f"{name} b{batch}"] = bench_precision.measure(
                        prototxt, batch, _input_shape(prototxt, batch), args.seed, workdir, args.runs, args.warmup)
        if not args.skip_extras:
            with tqdm(total=3, desc="extras") as bar:
                extras["load"] = load_time(workdir, runs=5)
                bar.update()
                extras["peak_rss"] = peak_rss(workdir, "resnet50")
                bar.update()
                extras["soak"] = soak_in_fresh_process(args.soak_calls)
                bar.update()
    meta["quiet_machine"] = quiet
    meta["others_cpu_mean"] = float(np.mean([c.others_cpu for c in cases])) if cases else 0.0
    rows = ratios(cases)
    goals = targets(rows, extras.get("load"))
    report = {"meta": meta, "cases": [{
        "model": c.model, "variant": c.variant, "batch": c.batch, "segments": c.segments,
        "segments_before": c.segments_before,
        "auto_choice": c.auto_choice,
        "runtimes": {k: {"status": m.status, "rel_l2": m.rel_l2,
                         "median_ms": m.timing.median * 1e3 if m.timing else None,
                         "p90_ms": m.timing.p90 * 1e3 if m.timing else None} for k, m in c.results.items()},
        "handoff": c.handoff, "others_cpu_cores": round(c.others_cpu, 3)} for c in cases], "ratios": rows, "targets": goals, **extras}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(cases, meta, extras, goals)
    if extras.get("precision"):
        import bench_precision
        text += "\n".join(bench_precision.markdown(extras["precision"], extras["cpu_features"])) + "\n"
    (args.out / "bench.md").write_text(text)
    chart(cases, args.out / "bench.png", meta)
    print(text)
    print(f"wrote {args.out / 'bench.json'}, bench.md, bench.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
