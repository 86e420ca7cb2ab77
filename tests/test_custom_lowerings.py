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
    assert row["layers"] == ["act2"] and row["origin"] == f"lowerings={EXAMPLE_LOWERINGS}"
    assert row["replaces_built_in"] is False and row["refused"] == {}


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
    assert net.partition.fallback_reasons["act2"] == (
        "shift and divisor must be numbers, divisor > 0 (said by the check of lower_hard_swish "
        f"(lowerings={EXAMPLE_LOWERINGS}))")


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
           "RuntimeError: half-installed" in out.stderr and "HYBRID_INFER_NO_ENTRY_POINTS=1" in out.stderr


TWO_PYTHON_LAYERS = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "a1" type: "Python" bottom: "conv" top: "a1"
        python_param { module: "hybrid_example_layers" layer: "HardSwish" param_str: '{"shift": 1.0}' } }
layer { name: "a2" type: "Python" bottom: "a1" top: "a2"
        python_param { module: "hybrid_example_layers" layer: "Swish" } }
layer { name: "conv2" type: "Convolution" bottom: "a2" top: "out" convolution_param { num_output: 4 kernel_size: 1 } }
"""


def _user_module(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text("from hybrid_infer.lowering import register_lowering\n" + textwrap.dedent(body))
    return path


def _load_and_check(prototxt: Path, modules: list[Path]) -> hybrid_infer.HybridNet:
    """Load with ``modules``, run, and assert the result still matches Caffe."""
    net = hybrid_infer.load(prototxt, random_weights=2, lowerings=modules, min_segment_size=1)
    x = {"data": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert rel_l2(net.run(x)["out"], net.run_caffe(x)["out"]) <= 1e-4
    return net


BROKEN_LOWERINGS = {
    "raises": ("def lower(ctx, layer, inputs, outputs):\n    raise KeyError('oops')\n",
               "raised KeyError: 'oops'"),
    "forgets_output": ("def lower(ctx, layer, inputs, outputs):\n    ctx.node('Relu', inputs, layer=layer.name)\n",
                       "did not write its output(s) a1"),
    "refuses": ("def lower(ctx, layer, inputs, outputs):\n    raise ctx.error(layer.name, 'I refuse')\n",
                "I refuse"),
    "unknown_op": ("def lower(ctx, layer, inputs, outputs):\n    ctx.node('NoSuchOp', inputs, outputs, layer=layer.name)\n",
                   "uses operator(s) ONNX does not define (NoSuchOp), so the shape of top 'a1' cannot be checked"),
    # ONNX Runtime refused this node, but OpenVINO ran it as a plain Relu: the schema check refuses it first
    "bad_attribute": ("def lower(ctx, layer, inputs, outputs):\n    ctx.node('Relu', inputs, outputs, layer=layer.name, "
                      "bogus=1)\n", "wrote a Relu node that ONNX's checker refuses: Unrecognized attribute: bogus"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_LOWERINGS))
def test_a_failing_user_lowering_moves_only_its_layer_to_caffe(python_layers, scoped_registry, make_prototxt,
                                                               tmp_path, kind, caplog) -> None:
    body, said = BROKEN_LOWERINGS[kind]
    module = _user_module(tmp_path, kind, '@register_lowering("Python", python_module="hybrid_example_layers", '
                                          'python_layer="HardSwish")\n' + body)
    net = _load_and_check(make_prototxt(TWO_PYTHON_LAYERS), [module])
    backends = {name: s.backend for s in net.partition.segments for name in s.layers}
    assert backends["a1"] == CAFFE and backends["conv"] == TENSORRT
    assert said in net.partition.fallback_reasons["a1"]
    assert "moving a1 to Caffe and partitioning again: the lowering refused it" in caplog.text


@pytest.mark.parametrize("answer, said", [("raise AttributeError('no_field')", "raised AttributeError: no_field"),
                                          ("return True", "returned True; a check returns None"),
                                          ("return 'too wide'", "too wide (said by the check of")])
def test_a_failing_or_odd_check_refuses_with_a_reason(python_layers, scoped_registry, make_prototxt, tmp_path,
                                                      answer, said) -> None:
    module = _user_module(tmp_path, "checked", f"""
        def check(layer, graph):
            {answer}

        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="HardSwish", check=check)
        def lower(ctx, layer, inputs, outputs):
            ctx.node("Identity", inputs, outputs, layer=layer.name)
    """)
    net = _load_and_check(make_prototxt(TWO_PYTHON_LAYERS), [module])
    assert said in net.partition.fallback_reasons["a1"]
    (row,) = json.loads(net.partition_report("json"))["user_lowerings"]
    assert row["layers"] == [] and list(row["refused"]) == ["a1"]
    assert "in Caffe: a1" in net.partition_report("text")


def test_several_refusals_in_one_segment_move_together(python_layers, scoped_registry, make_prototxt, tmp_path,
                                                        caplog) -> None:
    module = _user_module(tmp_path, "refuse_both", """
        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="HardSwish")
        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="Swish")
        def lower(ctx, layer, inputs, outputs):
            raise ctx.error(layer.name, "not today")
    """)
    _load_and_check(make_prototxt(TWO_PYTHON_LAYERS), [module])
    assert caplog.text.count("partitioning again") == 2  # both layers, one pass


def test_same_file_name_in_two_folders_both_register(python_layers, scoped_registry, make_prototxt, tmp_path) -> None:
    first = _user_module(tmp_path / "a", "lowerings", """
        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="HardSwish")
        def lower_hs(ctx, layer, inputs, outputs):
            import json
            o = {"shift": 3.0, "divisor": 6.0, **json.loads(layer.param.python_param.param_str or "{}")}
            g = ctx.node("Clip", [ctx.node("Add", [inputs[0], ctx.const(o["shift"], "s")], layer=layer.name)[0],
                                  ctx.const(0.0, "lo"), ctx.const(o["divisor"], "hi")], layer=layer.name)[0]
            m = ctx.node("Mul", [inputs[0], g], layer=layer.name)[0]
            ctx.node("Div", [m, ctx.const(o["divisor"], "d")], outputs, layer=layer.name)
    """)
    second = _user_module(tmp_path / "b", "lowerings", """
        @register_lowering("Python", python_module="hybrid_example_layers", python_layer="Swish")
        def lower_swish(ctx, layer, inputs, outputs):
            ctx.node("Mul", [inputs[0], ctx.node("Sigmoid", inputs, layer=layer.name)[0]], outputs, layer=layer.name)
    """)
    net = _load_and_check(make_prototxt(TWO_PYTHON_LAYERS), [first, second])
    assert [s.backend for s in net.partition.segments] == [TENSORRT]


def test_module_with_replace_can_be_named_again_after_a_scope(tmp_path) -> None:
    module = _user_module(tmp_path, "relu_again", """
        @register_lowering("ReLU", replace=True)
        def lower_relu(ctx, layer, inputs, outputs):
            ctx.node("Relu", inputs, outputs, layer=layer.name)
    """)
    for _ in range(2):
        with REGISTRY.scope():
            hybrid_infer.lowering.load_lowering_modules(str(module))  # a single name, not a list
            (row,) = [r for r in REGISTRY.registrations() if not r.built_in]
            assert REGISTRY.replaced_built_in(row.target)
    assert all(r.built_in for r in REGISTRY.registrations())


def test_redefining_a_lowering_replaces_it(scoped_registry) -> None:
    def make(alpha):
        def lower_leaky(ctx, layer, inputs, outputs):
            ctx.node("LeakyRelu", inputs, outputs, layer=layer.name, alpha=alpha)
        return lower_leaky
    register_lowering("ELU", replace=True)(make(0.5))
    register_lowering("ELU")(make(0.25))  # the cell run again: same module and name
    (row,) = [r for r in REGISTRY.registrations() if str(r.target) == "ELU"]
    assert row.lower.__closure__[0].cell_contents == 0.25


def test_decorator_with_replace_before_anything_is_loaded() -> None:
    """In a fresh process the built-ins are not loaded yet when user code registers."""
    code = textwrap.dedent(f"""
        import numpy as np, hybrid_infer
        from hybrid_infer.lowering import register_lowering
        calls = []
        @register_lowering("ReLU", replace=True)
        def my_relu(ctx, layer, inputs, outputs):
            calls.append(layer.name)
            ctx.node("Relu", inputs, outputs, layer=layer.name)
        net = hybrid_infer.load({str(GRAPHS / "lenet_digits" / "deploy.prototxt")!r}, random_weights=1)
        net.run({{"data": np.ones((1, 1, 16, 16), np.float32)}})
        print(sorted(calls))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['relu1', 'relu2', 'relu3']"


def test_registration_mistakes_are_explained(tmp_path, caplog) -> None:
    with pytest.raises(OptionError, match='write @register_lowering\\("MyType"\\)'):
        register_lowering(lambda ctx, layer, i, o: None)
    with pytest.raises(OptionError, match="check must be a function"):
        register_lowering("ReLU", check="x")
    with REGISTRY.scope():
        typo = _user_module(tmp_path, "typo", """
            @register_lowering("relu6")
            def lower(ctx, layer, inputs, outputs):
                pass
        """)
        hybrid_infer.lowering.load_lowering_modules([typo])
    assert "lowers layer type 'relu6', which this Caffe does not have (did you mean 'ReLU6'?)" in caplog.text
    hybrid_infer.lowering.load_lowering_modules(["json"])
    assert "lowering module json registered no lowering" in caplog.text
    with pytest.raises(OptionError, match="is a folder"):
        hybrid_infer.lowering.load_lowering_modules([str(tmp_path) + "/"])


def test_compare_takes_lowerings() -> None:
    out = _cli("compare", str(PYTHON_LAYER_NET), "--random-weights", "1", "--partition", "profile=tensorrt,min=3",
               "--runs", "1", "--warmup", "0", "--lowerings", "hybrid_example_lowerings")
    assert out.returncode == 0, out.stderr
    assert "lowerings not built" not in out.stderr


def test_entry_points_can_be_switched_off(tmp_path: Path) -> None:
    site = _installed_package(tmp_path, "raise RuntimeError('half-installed')\n")
    env_out = subprocess.run([*CLI, "partition", str(PYTHON_LAYER_NET)], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "HYBRID_INFER_NO_ENTRY_POINTS": "1",
                                  "PYTHONPATH": os.pathsep.join([str(GRAPHS / "python_layers"), str(site)])},
                             timeout=300)
    assert env_out.returncode == 0, env_out.stderr
