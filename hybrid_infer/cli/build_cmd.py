"""``hybrid-infer build``: prebuild every TensorRT segment's engine into the engine cache."""
from __future__ import annotations

import argparse
import time

from ..engines import trt_api
from ..engines.engine_cache import EngineCache
from ..executor.engine_factory import segment_onnx
from ..partition.partitioner import TENSORRT
from .common import add_build_options, add_model_options, build_settings, engine_cache, open_net, require_weights
from .precision_options import add_precision_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build (or find cached) TensorRT engines for every TensorRT segment",
                       description="Build TensorRT engines for a model's TensorRT segments into the "
                                   "engine cache; a second run finds them there.")
    add_model_options(p)
    add_build_options(p)
    add_precision_options(p)
    p.add_argument("--show-layers", action="store_true", help="list the layers TensorRT made of each segment")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_weights(args)
    net = open_net(args)
    api = trt_api.load(args.tensorrt_module)
    settings = build_settings(args)
    cache: EngineCache = engine_cache(args)
    segments = [s for s in net.partition.segments if s.backend == TENSORRT]
    precision = f"; {net.precision.label} from {net.precision.calibration.path}" if net.precision else ""
    print(f"{api.describe()}; {len(segments)} TensorRT segment(s); engine cache {cache.directory}{precision}")
    total = time.perf_counter()
    for i, segment in enumerate(segments, 1):
        label = f"segment{segment.id}"
        print(f"[{i}/{len(segments)}] {label}: {len(segment.layers)} layers ...", flush=True)
        onnx_model = segment_onnx(net.graph, net.model, segment)
        if net.precision is not None:
            onnx_model = net.precision.segment_model(onnx_model, segment, "tensorrt")
        built, lookup = cache.get_or_build(onnx_model, settings, api=api, label=label)
        how = "cache hit" if lookup.hit else f"built in {built.build_seconds:.2f} s"
        print(f"      {how}; plan {built.plan_size / 2**20:.2f} MiB; {len(built.network_layers)} network "
              f"layers{'' if built.engine_layers is None else f', {len(built.engine_layers)} engine layers'}"
              f"; {lookup.plan_path}")
        if args.show_layers:
            layers = built.engine_layers if built.engine_layers is not None else built.network_layers
            if built.engine_layers is None:
                print(f"      (parsed network shown: {built.engine_layers_note})")
            for layer in layers:
                print(f"        {layer.get('name', '?')}  [{', '.join(layer.get('caffe_layers', []))}]")
    print(f"done in {time.perf_counter() - total:.1f} s")
    return 0
