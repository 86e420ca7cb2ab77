#!/usr/bin/env python3
"""Train the bundled LeNet-style digit classifier (graphs/lenet_digits) with pycaffe.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, grey levels 0..16;
no download). Preprocessing, shared by training, the test split and the shipped
samples: scale to [0, 1], upsample 2x (nearest neighbour) to 16x16, then quantise
to the 8-bit grid (x = round(x * 255) / 255) so that a sample saved as an 8-bit
PNG and read back with ``--scale 1/255`` gives exactly the values in its ``.npy``.

Training uses a train net whose data and labels come from ``Input`` layers,
filled from numpy before every ``solver.step(1)`` (no data files, no Python
layers). The trained weights are copied into the deploy net, which is what is
saved, so the .caffemodel holds exactly the deploy layers' parameters.

Writes (each file atomically: temporary name, then rename):
  graphs/lenet_digits/deploy.prototxt
  graphs/lenet_digits/lenet_digits.caffemodel
  graphs/lenet_digits/labels.txt
  graphs/lenet_digits/samples/digit_<label>_<k>.npy   float32 (1, 1, 16, 16)
  graphs/lenet_digits/samples/digit_<label>_<k>.png   8-bit grey, same values * 255
where <k> is the sample's index in ``sklearn.datasets.load_digits()``.

Deterministic: fixed split, shuffling and Caffe seeds, single-threaded BLAS.
Usage: python scripts/train_lenet_digits.py [--out graphs/lenet_digits] [--iters 1200]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Before caffe/numpy load BLAS: one thread keeps results reproducible and the machine usable.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

SEED = 20240601
BATCH = 64
SIZE = 16  # the 8x8 digits upsampled 2x
ROOT = Path(__file__).resolve().parent.parent


def load_data(seed: int = SEED):
    """Return (x_train, y_train, x_test, y_test, idx_test): x float32 (N, 1, 16, 16) on the 8-bit grid."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("train_lenet_digits.py needs scikit-learn: pip install scikit-learn")
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0                # [0, 1]
    images = images.repeat(2, axis=1).repeat(2, axis=2)             # 8x8 -> 16x16, nearest
    images = quantise(images)[:, None, :, :]                        # (N, 1, 16, 16)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    i_train, i_test = train_test_split(idx, test_size=0.25, random_state=seed, stratify=labels)
    return images[i_train], labels[i_train], images[i_test], labels[i_test], i_test


def quantise(x: np.ndarray) -> np.ndarray:
    """Snap [0, 1] values to the 8-bit grid, as float32 u8 / 255 (what a PNG read with scale 1/255 gives)."""
    u8 = to_uint8(x)
    return (u8.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Net definitions: one body shared by the train and deploy nets, so layer names always match.

def _conv(name: str, bottom: str, num_output: int, kernel: int, pad: int) -> str:
    return f"""layer {{
  name: "{name}"
  type: "Convolution"
  bottom: "{bottom}"
  top: "{name}"
  param {{ lr_mult: 1 }}
  param {{ lr_mult: 2 }}
  convolution_param {{
    num_output: {num_output}
    kernel_size: {kernel}
    pad: {pad}
    stride: 1
    weight_filler {{ type: "msra" }}
    bias_filler {{ type: "constant" value: 0 }}
  }}
}}
"""


def _relu(name: str, blob: str) -> str:
    return f"""layer {{
  name: "{name}"
  type: "ReLU"
  bottom: "{blob}"
  top: "{blob}"
}}
"""


def _pool(name: str, bottom: str) -> str:
    return f"""layer {{
  name: "{name}"
  type: "Pooling"
  bottom: "{bottom}"
  top: "{name}"
  pooling_param {{
    pool: MAX
    kernel_size: 2
    stride: 2
  }}
}}
"""


def _ip(name: str, bottom: str, num_output: int) -> str:
    return f"""layer {{
  name: "{name}"
  type: "InnerProduct"
  bottom: "{bottom}"
  top: "{name}"
  param {{ lr_mult: 1 }}
  param {{ lr_mult: 2 }}
  inner_product_param {{
    num_output: {num_output}
    weight_filler {{ type: "msra" }}
    bias_filler {{ type: "constant" value: 0 }}
  }}
}}
"""


def _input(name: str, dims: tuple[int, ...]) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return f"""layer {{
  name: "{name}"
  type: "Input"
  top: "{name}"
  input_param {{ shape {{ {shape} }} }}
}}
"""


def body() -> str:
    """data (N,1,16,16) -> conv1 8@3x3 -> ReLU -> pool 2 -> conv2 16@3x3 -> ReLU -> pool 2 -> ip1 64 -> ReLU -> ip2 10."""
    return "".join([
        _conv("conv1", "data", 8, 3, 1), _relu("relu1", "conv1"), _pool("pool1", "conv1"),
        _conv("conv2", "pool1", 16, 3, 1), _relu("relu2", "conv2"), _pool("pool2", "conv2"),
        _ip("ip1", "pool2", 64), _relu("relu3", "ip1"),
        _ip("ip2", "ip1", 10),
    ])


def deploy_prototxt() -> str:
    header = ("# LeNet-style classifier for scikit-learn's 8x8 digits, upsampled to 16x16.\n"
              "# Input: grey image scaled to [0, 1] (uint8 / 255), shape 1x1x16x16. Output 'prob': 10 classes.\n"
              "# Written by scripts/train_lenet_digits.py; part of hybrid_infer (BSD-2-Clause).\n"
              'name: "lenet_digits"\n')
    softmax = """layer {
  name: "prob"
  type: "Softmax"
  bottom: "ip2"
  top: "prob"
}
"""
    return header + _input("data", (1, 1, SIZE, SIZE)) + body() + softmax


def train_prototxt() -> str:
    loss = """layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip2"
  bottom: "label"
  top: "loss"
}
"""
    return ('name: "lenet_digits_train"\n' + _input("data", (BATCH, 1, SIZE, SIZE))
            + _input("label", (BATCH,)) + body() + loss)


def solver_prototxt(train_net: Path, iters: int) -> str:
    return f"""train_net: "{train_net}"
base_lr: 0.02
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.1
stepsize: {max(1, int(iters * 0.75))}
max_iter: {iters}
display: 0
snapshot: 0
snapshot_prefix: "{train_net.parent / 'snap'}"
random_seed: {SEED}
solver_mode: CPU
"""


# ---------------------------------------------------------------------------------------------
# Atomic writes.

def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_npy(path: Path, array: np.ndarray) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_png(path: Path, u8: np.ndarray) -> None:
    from PIL import Image
    tmp = _tmp_path(path)
    Image.fromarray(np.ascontiguousarray(u8, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_net(net, path: Path) -> None:
    tmp = _tmp_path(path)
    net.save(str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------

def predict(net, x: np.ndarray) -> np.ndarray:
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    return net.forward()["prob"].copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "graphs" / "lenet_digits")
    ap.add_argument("--iters", type=int, default=1200, help="SGD iterations of batch %d" % BATCH)
    args = ap.parse_args(argv)

    try:
        import caffe
    except ImportError:
        sys.exit("train_lenet_digits.py needs pycaffe on the path (scripts/setup.sh builds it)")

    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test, idx_test = load_data()
    print(f"digits: {len(y_train)} train, {len(y_test)} test, input 1x{SIZE}x{SIZE}", flush=True)

    caffe.set_mode_cpu()
    caffe.set_random_seed(SEED)
    rng = np.random.RandomState(SEED)
    out: Path = args.out
    (out / "samples").mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="lenet_digits_") as work:
        work = Path(work)
        (work / "train.prototxt").write_text(train_prototxt())
        (work / "solver.prototxt").write_text(solver_prototxt(work / "train.prototxt", args.iters))
        solver = caffe.SGDSolver(str(work / "solver.prototxt"))
        net = solver.net

        order = rng.permutation(len(y_train))
        pos = 0
        running = None
        for it in range(args.iters):
            if pos + BATCH > len(order):
                order, pos = rng.permutation(len(y_train)), 0
            batch = order[pos:pos + BATCH]
            pos += BATCH
            net.blobs["data"].data[...] = x_train[batch]
            net.blobs["label"].data[...] = y_train[batch]
            solver.step(1)
            loss = float(net.blobs["loss"].data)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            if (it + 1) % 200 == 0 or it + 1 == args.iters:
                print(f"iter {it + 1:5d}  loss {running:.4f}", flush=True)

        deploy_path = out / "deploy.prototxt"
        write_text(deploy_path, deploy_prototxt())
        deploy = caffe.Net(str(deploy_path), caffe.TEST)
        for name, blobs in deploy.params.items():
            for dst, src in zip(blobs, net.params[name]):
                dst.data[...] = src.data
        model_path = out / "lenet_digits.caffemodel"
        save_net(deploy, model_path)

    # Evaluate the saved files, exactly as a user would load them.
    deploy = caffe.Net(str(out / "deploy.prototxt"), caffe.TEST, weights=str(model_path))
    prob = predict(deploy, x_test)
    pred = prob.argmax(axis=1)
    accuracy = float((pred == y_test).mean())
    train_acc = float((predict(deploy, x_train).argmax(axis=1) == y_train).mean())
    print(f"train accuracy {train_acc:.4f}  test accuracy {accuracy:.4f} "
          f"({int((pred == y_test).sum())}/{len(y_test)})", flush=True)

    write_text(out / "labels.txt", "".join(f"{d}\n" for d in range(10)))

    # One held-out sample per class: the first test image (in test-split order) that the
    # trained net classifies correctly, so the samples double as a smoke test.
    written = set()
    for label in range(10):
        candidates = [j for j in range(len(y_test)) if y_test[j] == label]
        skipped = 0
        for j in candidates:
            if pred[j] == label:
                break
            skipped += 1
        else:
            raise SystemExit(f"no correctly classified test sample of class {label}")
        k = int(idx_test[j])
        u8 = to_uint8(x_test[j, 0])
        x = (u8.astype(np.float32) / np.float32(255.0))[None, None]  # == x_test[j]
        assert np.array_equal(x, x_test[j:j + 1])
        stem = f"digit_{label}_{k}"
        write_npy(out / "samples" / f"{stem}.npy", x.astype(np.float32))
        write_png(out / "samples" / f"{stem}.png", u8)
        written.update({f"{stem}.npy", f"{stem}.png"})
        note = f" (skipped {skipped} misclassified)" if skipped else ""
        print(f"sample {stem}: p={prob[j, label]:.4f}{note}", flush=True)
    for stale in (out / "samples").glob("digit_*"):
        if stale.name not in written:
            stale.unlink()

    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
