"""The custom layer API: registering lowerings (decorator, --lowerings, entry points), clashes,
the worked HardSwish example, and check_lowering, all against real pycaffe and ONNX Runtime."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import hybrid_infer
from conftest import GRAPHS, REPO
from hybrid_infer.errors import LoweringError, OptionError
from hybrid_infer.lowering import REGISTRY, LoweringClash, register_lowering
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT
from hybrid_infer.testing import check_lowering, rel_l2

EXAMPLE_LOWERINGS = GRAPHS / "python_layers" / "hybrid_example_lowerings.py"
PYTHON_LAYER_NET = GRAPHS / "python_layer_net" / "deploy.prototxt"
CLI = [sys.executable, "-m", "hybrid_infer.cli.main"]


@pytest.fixture
def python_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))


@pytest.fixture
def scoped_registry():
    with REGISTRY.scope():
        yield REGISTRY


def _cli(*args: str, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [GRAPHS / "python_layers", *pythonpath]))}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_python_layer_without_lowering_says_how_to_move_it(python_layers, scoped_registry) -> None:
    net = hybrid_infer.load(PYTHON_LAYER_NET)
    assert [s.backend for s in net.partition.segments] == [TENSORRT, CAFFE, TENSORRT]
    reason = net.partition.fallback_reasons["act2"]
    assert "hybrid_example_layers.HardSwish" in reason and "register a lowering" in reason


def test_worked_example_runs_as_one_segment_and_matches_caffe(python_layers, scoped_registry) -> None:
    net = hybrid_infer.load(PYTHON_LAYER_NET, random_weights=7, lowerings=[str(EXAMPLE_LOWERINGS)])
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    batch = np.random.default_rng().standard_normal((3, 3, 32, 32)).astype(np.float32)
    blobs = net.outputs_with_logits()
    checked = hybrid_infer.load(PYTHON_LAYER_NET, random_weights=7, outputs=blobs)
    hybrid, reference = checked.run({"data": batch}), checked.run_caffe({"data": batch})
    for blob in blobs:
        assert rel_l2(hybrid[blob], reference[blob]) <= 1e-4, blob
    assert "act2" in checked.partition.segments[0].layers
    report = json.loads(checked.partition_report("json"))
    (row,) = report["user_lowerings"]
    assert row["target"] == "Python layer hybrid_example_layers.HardSwish"
    assert row["layers"] == ["act2"] and row["origin"] == f"--lowerings {EXAMPLE_LOWERINGS}"


@pytest.mark.parametrize("param_str", ["", '{"shift": 3.0, "divisor": 6.0}', '{"shift": 0.5}',
                                       '{"divisor": 2.5, "shift": -1.0}'])
def test_hard_swish_lowering_conformance(python_layers, scoped_registry, param_str: str) -> None:
    hybrid_infer.lowering.load_lowering_modules([EXAMPLE_LOWERINGS])
    result = check_lowering(
        'layer { name: "hs" type: "Python" bottom: "data" top: "out" python_param { '
        f'module: "hybrid_example_layers" layer: "HardSwish" param_str: {json.dumps(param_str)} }} }}',
        input_shapes={"data": (2, 4, 5, 6)}, inputs=lambda a: 4 * a)
    assert set(result.errors) == {("out", 2), ("out", 3)} and result.max_error <= 1e-5


def test_check_refuses_what_the_lowering_cannot_read(python_layers, scoped_registry, make_prototxt) -> None:
    hybrid_infer.lowering.load_lowering_modules([EXAMPLE_LOWERINGS])
    # The layer itself accepts a shift given as a string (it calls float()); the lowering does not.
    text = PYTHON_LAYER_NET.read_text().replace('"shift": 3.0', '"shift": "3"')
    assert text != PYTHON_LAYER_NET.read_text()
    net = hybrid_infer.load(make_prototxt(text))
    assert net.partition.fallback_reasons["act2"] == "shift and divisor must be numbers, divisor > 0"


def test_decorator_registration_and_replacement(scoped_registry) -> None:
    def lower_leaky(ctx, layer, inputs, outputs) -> None:
        ctx.node("LeakyRelu", inputs, outputs, layer=layer.name, alpha=0.25)

    with pytest.raises(LoweringClash, match=r"two lowerings for ReLU: hybrid_infer\.lowering\.activations"
                                            r"\.lower_relu \(built-in\) and .*lower_leaky"):
        register_lowering("ReLU")(lower_leaky)
    register_lowering("ReLU", replace=True)(lower_leaky)
    # The replacement is what runs: Caffe's plain ReLU now differs from the lowered net.
    with pytest.raises(AssertionError, match="relative L2 error"):
        check_lowering('layer { name: "r" type: "ReLU" bottom: "data" top: "out" }',
                       input_shapes={"data": (2, 3, 4, 4)})


def test_replacement_is_undone_by_scope() -> None:
    with REGISTRY.scope():
        register_lowering("ReLU", replace=True)(lambda ctx, layer, i, o: None)
    check_lowering('layer { name: "r" type: "ReLU" bottom: "data" top: "out" }', input_shapes={"data": (2, 3)})


def test_registration_arguments_are_checked() -> None:
    with pytest.raises(OptionError, match="python_module= and python_layer="):
        register_lowering("Python")
    with pytest.raises(OptionError, match="only apply to layer type 'Python'"):
        register_lowering("ReLU", python_module="x", python_layer="y")


def test_check_lowering_raises_for_a_refused_layer() -> None:
    with pytest.raises(LoweringError, match="batch statistics"):
        check_lowering('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "out" '
                       'batch_norm_param { use_global_stats: false } }', input_shapes={"data": (2, 3, 4, 4)})


def test_cli_lowerings_option_moves_the_layer_and_reports_it() -> None:
    out = _cli("partition", str(PYTHON_LAYER_NET), "--lowerings", "hybrid_example_lowerings")
    assert out.returncode == 0, out.stderr
    assert "1 segment(s)" in out.stdout
    assert "lowerings not built into hybrid_infer" in out.stdout
    assert "--lowerings hybrid_example_lowerings" in out.stdout


def test_cli_unknown_lowering_module_is_a_clean_error() -> None:
    out = _cli("partition", str(PYTHON_LAYER_NET), "--lowerings", "no_such_lowering_module")
    assert out.returncode == 2
    assert out.stderr.strip() == ("hybrid-infer: error: lowering module 'no_such_lowering_module' cannot be "
                                  "found; put its folder on PYTHONPATH or pass the path of its .py file")


def _installed_package(root: Path, body: str, entry: str = "demo_lowerings") -> Path:
    """A package installed the way pip leaves one (module + dist-info with entry_points.txt)."""
    (root / "demo_lowerings.py").write_text(textwrap.dedent(body))
    info = root / "demo_lowerings-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-lowerings\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hybrid_infer.lowerings]\nswish = {entry}\n")
    return root


def test_installed_entry_point_adds_a_lowering_without_code_changes(tmp_path: Path) -> None:
    site = _installed_package(tmp_path, """
        from hybrid_infer.lowering import register_lowering

        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="Swish")
        def lower_swish(ctx, layer, inputs, outputs):
            import json
            beta = float(json.loads(layer.param.python_param.param_str or "{}").get("beta", 1.0))
            scaled = ctx.node("Mul", [inputs[0], ctx.const(beta, layer.name + "/beta")], layer=layer.name)[0]
            gate = ctx.node("Sigmoid", [scaled], layer=layer.name)[0]
            ctx.node("Mul", [inputs[0], gate], outputs, layer=layer.name)
    """)
    model = GRAPHS / "python_layer_positions" / "python_layer_branch.prototxt"
    out = _cli("partition", str(model), "--format", "json", pythonpath=[site])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [s["backend"] for s in report["segments"]] == [TENSORRT]
    (row,) = report["user_lowerings"]
    assert row["origin"] == "entry point 'swish' of package demo-lowerings"
    checked = _cli("run", str(model), "--random-weights", "3", "--check", pythonpath=[site])
    assert checked.returncode == 0, checked.stderr
    assert "ABOVE" not in checked.stdout and "OK" in checked.stdout


def test_broken_entry_point_is_a_clean_error(tmp_path: Path) -> None:
    site = _installed_package(tmp_path, "raise RuntimeError('half-installed')\n")
    out = _cli("partition", str(PYTHON_LAYER_NET), pythonpath=[site])
    assert out.returncode == 2
    assert "entry point 'swish' (demo_lowerings) of the installed package demo-lowerings failed to import: " \
           "RuntimeError: half-installed" in out.stderr
