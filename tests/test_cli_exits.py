"""How the real ``hybrid-infer`` process ends when its surroundings fail (issue 13, the
review's kinds 7, 15, 21): a reader that stops early, a full disk or a closed standard
output, SIGTERM, and error text holding control characters. Each runs the installed
command in a subprocess, as a shell would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GRAPHS, REPO

LENET = [str(GRAPHS / "lenet_digits/deploy.prototxt"),
         "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")]
COMMAND = [sys.executable, "-m", "hybrid_infer.cli.main"]


def _shell(line: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HI": " ".join(COMMAND), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {line}"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    proc = _shell(f"$HI run {' '.join(LENET)} | head -1", tmp_path)
    assert proc.stdout.startswith("note: no --input")
    assert proc.stderr == "" and proc.returncode == 141  # as a tool killed by SIGPIPE reports it
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_on_standard_output_is_one_error_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    proc = _shell(f"$HI run {' '.join(LENET)} > /dev/full", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "hybrid-infer: error: cannot write to standard output (No space left on device)\n"


def test_a_closed_standard_output_is_one_error_line(tmp_path):
    proc = _shell(f"$HI run {' '.join(LENET)} >&-", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ("hybrid-infer: error: standard output is closed; give the command somewhere to write, "
                           "e.g. >/dev/null\n")


def test_control_characters_in_an_error_stay_on_one_line(tmp_path):
    prototxt = tmp_path / "nul\nname.prototxt"
    prototxt.write_bytes(b'name: "t"\x00\n')
    proc = subprocess.run([*COMMAND, "partition", str(prototxt)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "nul\\nname.prototxt: holds binary data (a NUL byte on line 1)" in proc.stderr


def test_sigterm_during_a_run_removes_the_temporary_files(tmp_path):
    """SIGTERM is handled as Ctrl-C is: the model's temporary folders are removed (the
    wait here is the rehearsal of a Python layer that sleeps)."""
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "slow_layer.py").write_text(
        "import time, caffe\n"
        "class Slow(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top): time.sleep(600)\n")
    prototxt = tmp_path / "slow.prototxt"
    prototxt.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
                        'layer { name: "s" type: "Python" bottom: "data" top: "s" '
                        'python_param { module: "slow_layer" layer: "Slow" } }\n')
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'layers'}:{REPO}", "TMPDIR": str(temp)}
    proc = subprocess.Popen([*COMMAND, "run", str(prototxt), "--random-weights", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("hybrid_infer_caffe_") for p in temp.iterdir()):  # in the segment's rehearsal
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert proc.stderr.read() == b"hybrid-infer: terminated\n"
    assert list(temp.iterdir()) == []


def test_a_chart_with_an_unusable_home_folder_warns_nothing(tmp_path):
    """matplotlib falls back to a temporary cache folder when HOME cannot hold one, and says
    so in two log lines; the chart is drawn all the same, so hybrid-infer stays quiet."""
    pytest.importorskip("matplotlib")
    env = {key: value for key, value in os.environ.items() if key not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME",
                                                                          "XDG_CACHE_HOME")}
    env.update(HOME="/dev/null", TMPDIR=str(tmp_path))
    proc = subprocess.run([*COMMAND, "compare", *LENET, "--partition", "caffe", "--runs", "1", "--warmup", "0",
                           "--plot", str(tmp_path / "chart.png")], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["measuring 1 partition(s), 0 warm-up + 1 timed run(s) each",
                                        f"wrote {tmp_path / 'chart.png'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]  # matplotlib's folder is gone too
