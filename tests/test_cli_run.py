"""`hybrid-infer run` and `export` as a user runs them: the README's main job included."""
from __future__ import annotations

import json
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
