"""`hybrid-infer run` and `export` as a user runs them: the README's main job included."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx

from conftest import GRAPHS, REPO

LENET = [str(GRAPHS / "lenet_digits/deploy.prototxt"), "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", *args], capture_output=True,
                          text=True, check=check, cwd=REPO)


def test_readme_main_job_classifies_the_samples(tmp_path):
    samples = sorted((GRAPHS / "lenet_digits/samples").glob("*.png"))
    out = tmp_path / "out.npz"
    proc = cli("run", *LENET, "--input", *map(str, samples), "--scale", "0.00392156862745098",
               "--labels", str(GRAPHS / "lenet_digits/labels.txt"), "--top", "3", "--check", "-o", str(out))
    for i, sample in enumerate(samples):
        label = sample.stem.split("_")[1]
        assert re.search(rf"\[{i}\] {sample.name}: {label} \(", proc.stdout), proc.stdout
    assert re.search(r"prob: max abs error .* OK \(tolerance 0.0001\), top-1 agreement 100%", proc.stdout)
    with np.load(out) as saved:
        assert saved["prob"].shape == (10, 10)
        assert np.argmax(saved["prob"], 1).tolist() == [int(s.stem.split("_")[1]) for s in samples]


def test_a_run_leaves_nothing_in_the_temporary_folder(tmp_path):
    """ONNX Runtime's telemetry wrote TMPDIR/.ses whenever something imported it before the
    engine module had turned telemetry off (auto's engine choice does): found by the fuzz run."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", *LENET, "--input",
                           str(sorted((GRAPHS / "lenet_digits/samples").glob("*.npy"))[0])],
                          capture_output=True, text=True, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
                          | {"TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr
    assert not list(scratch.iterdir())


def test_npy_input_batch_and_output_blob():
    sample = next((GRAPHS / "lenet_digits/samples").glob("digit_3_*.npy"))
    proc = cli("run", *LENET, "--input", f"data={sample}", "--batch", "4", "--output-blob", "ip2", "--check")
    assert "ip2: shape (4, 10)" in proc.stdout and "OK" in proc.stdout


def test_bad_input_files_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    (tmp_path / "x.txt").write_text("1 2 3")
    for args, message in ((["--input", str(broken)], "cannot read this image"),
                          (["--input", str(tmp_path / "missing.npy")], "does not exist"),
                          (["--input", f"label={broken}"], "'label' is not an input"),
                          (["--input", str(tmp_path / "x.txt")], "unknown input format")):
        proc = cli("run", *LENET, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_run_without_weights_says_what_to_do():
    proc = cli("run", str(GRAPHS / "lenet_digits/deploy.prototxt"), check=False)
    assert proc.returncode == 2 and "--random-weights SEED" in proc.stderr


def test_export_writes_checked_onnx_and_manifest(tmp_path, monkeypatch):
    env_path = str(GRAPHS / "python_layers")
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "export",
                           str(GRAPHS / "python_layer_net/deploy.prototxt"), "--random-weights", "1",
                           "--min-segment-size", "1", "-o", str(tmp_path)],
                          capture_output=True, text=True, check=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    exported = [s for s in manifest["segments"] if s["backend"] == "tensorrt"]
    assert len(exported) == 2 and proc.stdout.count(".onnx") == 2
    for entry in exported:
        model = onnx.load(tmp_path / entry["onnx"])
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == entry["inputs"]
        assert [o.name for o in model.graph.output] == entry["outputs"]


UNSQUEEZE_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 8 } }
layer { name: "u" type: "Unsqueeze" bottom: "fc" top: "u" unsqueeze_param { dim: 2 } }
layer { name: "u2" type: "Unsqueeze" bottom: "u" top: "u2" unsqueeze_param { dim: 3 } }
layer { name: "conv" type: "Convolution" bottom: "u2" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "out" }
"""


def test_check_at_a_batch_caffe_cannot_run_is_one_line(tmp_path):
    """The reviewer's command: it used to end in a traceback and 'double free or corruption'.
    Random inputs are drawn (and reported) at the batch asked for."""
    path = tmp_path / "unsqueeze.prototxt"
    path.write_text(UNSQUEEZE_NET)
    proc = cli("run", str(path), "--random-weights", "1", "--check", "--batch", "3", check=False)
    assert "random normal values of shape (3, 6)" in proc.stdout
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip()
    assert "\n" not in error and "layer 'u' (Unsqueeze)" in error and "--input-shape data=3x6" in error
    proc = cli("run", str(path), "--random-weights", "1", "--check", "--batch", "3", "--input-shape", "data=3x6")
    assert re.search(r"out: max abs error .* OK", proc.stdout), proc.stdout


EMBED_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "emb" type: "Embed" bottom: "data" top: "emb" embed_param { num_output: 4 input_dim: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "emb" top: "fc" inner_product_param { num_output: 3 axis: 2 } }
layer { name: "relu" type: "ReLU" bottom: "fc" top: "out" }
"""


def test_embed_inputs_are_indices(tmp_path):
    """Random inputs of an Embed-fed input are valid indices (and --check agrees with Caffe); an
    index out of range is a one-line error naming the input and the layer, not ORT's traceback."""
    path = tmp_path / "embed.prototxt"
    path.write_text(EMBED_NET)
    proc = cli("run", str(path), "--random-weights", "1", "--check")
    assert "random whole numbers in [0, 2) of shape (2, 5)" in proc.stdout
    assert re.search(r"out: max abs error 0, relative L2 0 OK", proc.stdout), proc.stdout
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[0, 1, 5, 0, 1], [1, 1, 0, 0, 0]], np.float32))
    proc = cli("run", str(path), "--random-weights", "1", "--check", "--input", str(bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("hybrid-infer: error: input 'data' holds 5 at (0, 2), but layer 'emb' (Embed) "
                                   "takes whole numbers in [0, 2) as row indices")
