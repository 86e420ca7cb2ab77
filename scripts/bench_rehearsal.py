"""What rehearsing Caffe work in a forked child costs (model/isolated.py).

The first reshape and forward of each Caffe net at each new input shape is done in a forked
child before it is done in-process, so that a Caffe abort becomes an error. This measures,
per model, on pure Caffe (``run_caffe``'s reference net, the largest Caffe net there is):

- fork alone: ``call_isolated`` of nothing, with the model loaded (page tables to copy);
- rehearsal: the child's reshape + forward at a new input shape, fork included;
- first forward: the same work in-process right after (new shape: Caffe allocates);
- warm forward: the in-process forward again at that shape (what every later run costs).

Only the first run at each input shape pays the rehearsal; later runs pay nothing.
Medians over batch sizes 1..N, each a new shape.

    .venv/bin/python scripts/bench_rehearsal.py [--models lenet googlenet ...] [--shapes 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

import hybrid_infer
from hybrid_infer.model.caffe_import import caffe
from hybrid_infer.model.isolated import Rehearsal, call_isolated

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
MODELS = {
    "lenet_digits": (REPO / "graphs/lenet_digits/deploy.prototxt",
                     REPO / "graphs/lenet_digits/lenet_digits.caffemodel"),
    "python_layer_net": (REPO / "graphs/python_layer_net/deploy.prototxt", None),
    "squeezenet1.1": (SHARED / "squeezenet_v1.1/deploy.prototxt", None),
    "googlenet": (SHARED / "bvlc_googlenet/deploy.prototxt", None),
    "resnet50": (SHARED / "resnet_50/ResNet-50-deploy.prototxt", None),
}


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(name: str, shapes: int) -> dict[str, float]:
    prototxt, weights = MODELS[name]
    net = hybrid_infer.load(prototxt, weights, random_weights=None if weights else 1)
    reference = net.model.reference_net()
    caffe().set_mode_cpu()
    blob, shape = next(iter(net.input_shapes().items()))
    rows: dict[str, list[float]] = {"fork alone": [], "rehearsal": [], "first forward": [], "warm forward": []}
    rehearsal = Rehearsal()
    rng = np.random.default_rng(0)
    for batch in range(1, shapes + 1):
        x = rng.standard_normal((batch, *shape[1:])).astype(np.float32)

        def step() -> None:
            reference.blobs[blob].reshape(*x.shape)
            reference.reshape()
            reference.blobs[blob].data[...] = x
            reference._forward(0, len(reference.layers) - 1)
        rows["fork alone"].append(_ms(lambda: call_isolated(lambda: None)))
        rows["rehearsal"].append(_ms(lambda: rehearsal.check(("batch", batch), step)))
        rows["first forward"].append(_ms(step))
        rows["warm forward"].append(_ms(step))
    result = {key: statistics.median(values) for key, values in rows.items()}
    with open("/proc/self/status") as f:
        result["rss_mib"] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    net.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", type=int, default=5, help="new input shapes per model (batch 1..N)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "graphs/python_layers"))
    print(f"median over batch 1..{args.shapes} (each a new input shape), ms; pure Caffe reference net, CPU\n")
    print("| model | RSS MiB | fork alone | rehearsal (fork + forward in child) | first forward in-process "
          "| warm forward | rehearsal / warm forward |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        if not MODELS[name][0].is_file():
            print(f"| {name} | (absent: {MODELS[name][0]}) | | | | | |")
            continue
        r = measure(name, args.shapes)
        print(f"| {name} | {r['rss_mib']:.0f} | {r['fork alone']:.1f} | {r['rehearsal']:.1f} | "
              f"{r['first forward']:.1f} | {r['warm forward']:.1f} | {r['rehearsal'] / r['warm forward']:.2f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
