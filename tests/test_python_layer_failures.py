"""Python layers that misbehave (issue 13, the review's kinds 2, 10, 12, 19, 20): every one ends
in one clear line naming the layer or the user's file, never a hang, a left-over process or
advice that does not help; and ``diff`` says so when Caffe itself is not deterministic.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.analysis.bisect import bisect
from hybrid_infer.analysis.layer_diff import Settings, caffe_values, layer_diff
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError

from conftest import REPO
from fuzz_mutators import HOSTILE_LAYERS

HEAD = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'


def _python(layer: str, module: str = "hostile_layers", param: str = "", bottom: str = "data", top: str = "py") -> str:
    return (f'layer {{ name: "py" type: "Python" bottom: "{bottom}" top: "{top}" '
            f'python_param {{ module: "{module}" layer: "{layer}" param_str: "{param}" }} }}\n')


CONV_AFTER = ('layer { name: "c" type: "Convolution" bottom: "py" top: "c" '
              'convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }\n')


@pytest.fixture
def layers(tmp_path, monkeypatch) -> Path:
    """A folder on sys.path holding hostile_layers.py (fuzz_mutators.HOSTILE_LAYERS)."""
    folder = tmp_path / "layers"
    folder.mkdir()
    (folder / "hostile_layers.py").write_text(HOSTILE_LAYERS)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _x() -> dict[str, np.ndarray]:
    return {"data": np.random.default_rng().standard_normal((1, 2, 4, 4)).astype(np.float32)}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("layer, message", [
    ("MultiLineError", r"ValueError: first line second line third \(raised in hostile_layers\.py:\d+, forward\)"),
    ("UnprintableError", r"Unprintable: \(its message cannot be shown: str\(\) raised RuntimeError\) "
                         r"\(raised in hostile_layers\.py:\d+, forward\)"),
])
def test_python_layer_errors_are_one_line_whatever_their_message(make_prototxt, layers, capsys, layer, message):
    path = make_prototxt(HEAD + _python(layer))
    with hybrid_infer.load(path, random_weights=0) as net:
        for call in (net.run, net.run_caffe):
            with pytest.raises(ModelError, match=message) as caught:
                call(_x())
            assert "\n" not in str(caught.value)
    assert main(["run", str(path), "--random-weights", "0"]) == 2
    assert "first line second line" in _one_error_line(capsys) or layer != "MultiLineError"


@pytest.mark.parametrize("module_text, message", [
    ("import sys\nsys.exit(3)\n", r"the process ended \(exit status 3\) before Caffe finished.*sys\.exit\(\)"),
    ("import os\nos._exit(0)\n", r"the process ended \(exit status 0\) before Caffe finished"),
    ("import caffe\ndef broken(:\n", r"SyntaxError: .* \(in bad_module\.py:2\)"),
])
def test_a_layer_module_failing_at_import_is_named(make_prototxt, layers, capsys, module_text, message):
    (layers / "bad_module.py").write_text(module_text)
    path = make_prototxt(HEAD + _python("X", module="bad_module"))
    with pytest.raises(ModelError, match=rf"Caffe cannot set this net up: {message}"):
        hybrid_infer.load(path)
    assert main(["partition", str(path)]) == 2
    _one_error_line(capsys)


def test_exit_in_setup_is_an_error(make_prototxt, layers):
    with pytest.raises(ModelError, match=r"SystemExit: 3 \(raised in hostile_layers\.py:\d+, setup\)"):
        hybrid_infer.load(make_prototxt(HEAD + _python("ExitInSetup")))


def test_a_helper_process_holding_stderr_does_not_hang_the_rehearsal(make_prototxt, layers, tmp_path):
    """The rehearsal child's helper keeps the child's stderr pipe open for ten minutes; the
    parent waits for the child, not for the pipe, and ends the child's process group."""
    helpers = tmp_path / "helpers.txt"
    path = make_prototxt(HEAD + _python("StartsAHelper", param=str(helpers)) + CONV_AFTER)
    env = {**os.environ, "PYTHONPATH": f"{layers}:{REPO}"}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    try:
        with open(out, "w") as stdout, open(err, "w") as stderr:  # files: the helpers hold them open
            proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(path),
                                   "--random-weights", "1", "--check"], stdout=stdout, stderr=stderr, env=env,
                                  timeout=300)
        assert proc.returncode == 0, err.read_text()
        assert "c: max abs error" in out.read_text()
        pids = [int(p) for p in helpers.read_text().split()]
        assert len(pids) >= 2  # the rehearsal's and this process's own
        rehearsed = pids[0]
        time.sleep(0.5)
        assert not _alive(rehearsed), "the rehearsal's helper outlived the rehearsal"
    finally:
        for pid in (int(p) for p in helpers.read_text().split()) if helpers.exists() else ():
            _kill(pid)  # the helpers the user's own process started are the user's: ours to tidy here


HANG = HEAD + ('layer { name: "py" type: "Python" bottom: "data" top: "py" '
               'python_param { module: "hang_layer" layer: "Hang" } }\n')
HANG_MODULE = '''
import time, caffe
class Hang(caffe.Layer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top): time.sleep(600)
'''


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_no_rehearsal_child_outlives_its_parent(make_prototxt, tmp_path, signum, status):
    (tmp_path / "hang_layer.py").write_text(HANG_MODULE)
    path = make_prototxt(HANG)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_infer.cli.main", "run", str(path), "--random-weights", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    children: list[int] = []
    deadline = time.monotonic() + 120
    while not children and time.monotonic() < deadline:  # the rehearsal child, hanging in forward
        time.sleep(0.2)
        children = _children(proc.pid)
    assert children, "no rehearsal child appeared"
    time.sleep(0.5)
    os.kill(proc.pid, signum)
    proc.wait(timeout=60)
    assert proc.returncode == status, proc.stderr.read()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)
    if signum != signal.SIGKILL:  # handled: the temporary folders are gone too
        assert list(temp.iterdir()) == []
        assert proc.stderr.read().decode().strip() == ("hybrid-infer: terminated" if signum == signal.SIGTERM
                                                       else "hybrid-infer: interrupted")


def test_a_top_grown_in_forward_is_named_instead_of_wrong_advice(make_prototxt, layers, capsys):
    path = make_prototxt(HEAD + _python("GrowsInForward") + CONV_AFTER)
    assert main(["run", str(path), "--random-weights", "1", "--min-segment-size", "1"]) == 2
    line = _one_error_line(capsys)
    assert ("layer 'py' (Python) wrote its top 'py' with shape (1, 2, 6, 4) at forward, but its reshape gave "
            "(1, 2, 4, 4)") in line and "--fallback" not in line


def test_diff_says_when_caffe_itself_is_not_deterministic_and_blames_nothing_after_it(make_prototxt, layers, capsys):
    """The review's case: a Python layer with random output between lowered layers. Caffe run
    twice disagrees with itself there, so diff says so and does not bisect; bisect itself
    blames no layer after the first mismatch (all TensorRT layers here come after it)."""
    body = (HEAD.replace("dim: 2", "dim: 3")
            + 'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" '
              'convolution_param { num_output: 4 kernel_size: 1 } }\n'
            + 'layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n'
            + _python("RandomOutput", bottom="c1", top="e")
            + 'layer { name: "c2" type: "Convolution" bottom: "e" top: "c2" '
              'convolution_param { num_output: 4 kernel_size: 1 } }\n'
            + 'layer { name: "r2" type: "TanH" bottom: "c2" top: "c2" }\n'
            + 'layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3" '
              'convolution_param { num_output: 4 kernel_size: 1 } }\n')
    path = make_prototxt(body)
    assert main(["diff", str(path), "--random-weights", "1", "--bisect"]) == 1
    out = capsys.readouterr().out
    assert "<- first above tolerance" in out and "pure Caffe is not deterministic here" in out
    assert "bisect: not run" in out and "smallest set found" not in out
    with hybrid_infer.load(path, random_weights=1) as net:
        x = {"data": np.random.default_rng().standard_normal((1, 3, 4, 4)).astype(np.float32)}
        settings = Settings(engine="onnxruntime")
        diff = layer_diff(net, settings, x, 1e-4)
        assert diff.first_above.value == "e" and diff.caffe_unstable
        found = bisect(net, settings, x, caffe_values(net, x), 1e-4)
        assert found.culprits == [] and "has no TensorRT layer at or before it" in found.explanation


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


SYS_EXIT_AFTER_OPENVINO = """
import sys
import hybrid_infer
from hybrid_infer.errors import ModelError
from hybrid_infer.testing import cpu_engine, load_text, lower_whole_net, one_layer
model, graph = load_text(one_layer("ReLU", data=(1, 2, 4, 4)))
engine = cpu_engine(lower_whole_net(model, graph, ["out"]), "openvino")  # its stream executor's threads
try:
    hybrid_infer.load(sys.argv[1])
except ModelError as exc:
    print(exc)
"""


def test_a_layer_module_exiting_in_the_rehearsal_does_not_hang_on_openvino_state(make_prototxt, layers, tmp_path):
    """Found when OpenVINO joined: a forked rehearsal child that a layer module's sys.exit sends
    through interpreter finalization tore down the parent's OpenVINO objects, whose worker
    threads had not survived the fork, and waited for them forever."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install '.[openvino]'")
    (layers / "bad_module.py").write_text("import sys\nsys.exit(3)\n")
    path = make_prototxt(HEAD + _python("X", module="bad_module"))
    script = tmp_path / "exit_after_openvino.py"
    script.write_text(SYS_EXIT_AFTER_OPENVINO)
    env = {**os.environ, "PYTHONPATH": f"{layers}:{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "the process ended (exit status 3) before Caffe finished" in proc.stdout, proc.stdout + proc.stderr
