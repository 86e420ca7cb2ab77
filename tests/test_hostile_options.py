"""Numbers from the command line and the API, and verdicts on NaN (issue 13, kinds 5 and 7)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.cli.main import main
from hybrid_infer.errors import HybridInferError, InputError, OptionError
from hybrid_infer.metrics import compare_outputs, relative_l2

from conftest import GRAPHS

PROTOTXT = str(GRAPHS / "lenet_digits/deploy.prototxt")
WEIGHTS = str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")
LENET = [PROTOTXT, "--weights", WEIGHTS]


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("command, option, value, says", [
    ("run", "--batch", "0", "must be 1 or more, not 0"),
    ("run", "--batch", "-1", "must be 1 or more, not -1"),
    ("run", "--batch", "2147483648", "must be at most 2147483647"),
    ("run", "--batch", "x", "expected a whole number, not 'x'"),
    ("run", "--workspace", "nan", "must be a finite number, not nan"),
    ("run", "--workspace", "inf", "must be a finite number, not inf"),
    ("run", "--workspace", "0", "must be above 0"),
    ("run", "--workspace", "1e30", "must be at most 1.04858e+06"),
    ("run", "--random-weights", "-1", "must be 0 or more, not -1"),
    ("run", "--input-shape", "data=1x1x99999999999999999999x16", "each dimension must be at most 2147483647"),
    ("run", "--input-shape", "data=1x0x16x16", "each dimension must be 1 or more, not 0"),
    ("run", "--input-shape", "data", "expected NAME=DxDx..."),
    ("run", "--tolerance", "-1e-3", "must be at least 0, not -0.001"),
    ("run", "--tolerance", "nan", "must be a finite number, not nan"),
    ("run", "--top", "-3", "must be 1 or more, not -3"),
    ("run", "--resize", "0x0", "each dimension must be 1 or more, not 0"),
    ("run", "--resize", "100000x100000", "100000x100000 is 10000000000 pixels; at most 89478485"),
    ("run", "--scale", "inf", "must be a finite number, not inf"),
    ("run", "--max-batch", "0", "must be 1 or more"),
    ("run", "--device", "-1", "must be 0 or more"),
    ("run", "--min-segment-size", "-2", "must be 0 or more, not -2"),
    ("diff", "--tolerance", "nan", "must be a finite number, not nan"),
    ("compare", "--runs", "0", "must be 1 or more, not 0"),
    ("compare", "--warmup", "-1", "must be 0 or more, not -1"),
    ("build", "--timing-iterations", "0", "must be 1 or more, not 0"),
    ("partition", "--min-segment-size", "1e3", "expected a whole number"),
])
def test_every_option_is_checked_when_parsed(capsys, command, option, value, says):
    weights = [] if command == "partition" else ["--weights", WEIGHTS]
    with pytest.raises(SystemExit) as exit_:
        main([command, PROTOTXT, *weights, f"{option}={value}"])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert line.startswith(f"hybrid-infer {command}: error: argument {option}: {says}"), line


def test_opt_batch_above_max_batch_is_refused(capsys):
    assert main(["build", *LENET, "--max-batch", "2", "--opt-batch", "4"]) == 2
    assert "--opt-batch 4 is above --max-batch 2" in _error_line(capsys)


def test_a_batch_too_large_for_memory_is_refused_before_allocating(capsys):
    assert main(["run", *LENET, "--batch", "2000000000"]) == 2
    line = _error_line(capsys)
    assert "at batch 2000000000 needs about" in line and "GiB of memory" in line and "--batch" in line
    net = hybrid_infer.load(PROTOTXT, WEIGHTS)
    with pytest.raises(InputError, match="needs about .* GiB of memory"):
        net.check_memory(2**31 - 1)


LOAD_UNDER_LIMIT = """
import resource, sys
import hybrid_infer
from hybrid_infer.errors import HybridInferError
from hybrid_infer.memory_budget import address_space_bytes
limit = address_space_bytes() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    hybrid_infer.load(sys.argv[1], random_weights=1)
    print("no error")
except HybridInferError as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


def test_random_weights_too_large_for_memory_are_refused(make_prototxt, tmp_path):
    """100 M parameters: Caffe sets them up in 400 MB, random weights need 1.2 GB more, and the
    process may take 700 MB more than it has mapped after its imports: one error, no MemoryError.
    A fresh process, so that memory freed by earlier tests cannot absorb the allocations. (Less
    headroom than OpenBLAS's 128 MB buffer per worker thread makes OpenBLAS retry its mmap
    forever, which hangs the next fork: not a limit anyone runs Caffe under.)"""
    path = make_prototxt('''
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 10000 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10000 } }''')
    script = tmp_path / "load_under_limit.py"
    script.write_text(LOAD_UNDER_LIMIT)

    def load(extra: int) -> str:
        proc = subprocess.run([sys.executable, str(script), str(path), str(extra)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stdout.strip()
    message = load(700 * 2**20)
    # Which comes first: Caffe's own allocation check of the 400 MB weight blob (caught in the
    # rehearsal child), or the budget for the random weights drawn after it.
    assert (message.startswith("InputError: random weights for") and "needs about 1.1 GiB of memory" in message
            or message.startswith("ModelError: ") and "host allocation of size 400000000 failed" in message), message
    assert load(4 * 2**30) == "no error"


def _lenet() -> hybrid_infer.HybridNet:
    return hybrid_infer.load(PROTOTXT, WEIGHTS)


API_CALLS = {
    "prototxt int": (lambda: hybrid_infer.load(123), OptionError, "prototxt must be a file path"),
    "seed str": (lambda: hybrid_infer.load(PROTOTXT, random_weights="1"), OptionError, "must be a whole"),
    "seed negative": (lambda: hybrid_infer.load(PROTOTXT, random_weights=-1), OptionError, "0 or more"),
    "seed bool": (lambda: hybrid_infer.load(PROTOTXT, random_weights=True), OptionError, "not bool True"),
    "fallback str": (lambda: hybrid_infer.load(PROTOTXT, fallback="LRN"), OptionError, "list of names"),
    "outputs str": (lambda: hybrid_infer.load(PROTOTXT, outputs="prob"), OptionError, "list of names"),
    "min str": (lambda: hybrid_infer.load(PROTOTXT, min_segment_size="3"), OptionError, "whole number"),
    "engine int": (lambda: hybrid_infer.load(PROTOTXT, engine=5), OptionError, "engine must be one of"),
    "profile None": (lambda: hybrid_infer.load(PROTOTXT, profile=None), OptionError, "profile must be one of"),
    "shape str": (lambda: hybrid_infer.load(PROTOTXT, input_shapes={"data": "1x1"}), OptionError, "sequence of dim"),
    "shapes list": (lambda: hybrid_infer.load(PROTOTXT, input_shapes=[1, 2]), OptionError, "map input names"),
    "shape huge": (lambda: hybrid_infer.load(PROTOTXT, input_shapes={"data": (1, 1, 2**40, 1)}), OptionError,
                   "at most 2147483647"),
    "device str": (lambda: hybrid_infer.load(PROTOTXT, device="0"), OptionError, "device must be a whole number"),
    "settings dict": (lambda: hybrid_infer.load(PROTOTXT, build_settings={}), OptionError, "BuildSettings"),
    "cache int": (lambda: hybrid_infer.load(PROTOTXT, engine_cache=3), OptionError, "EngineCache"),
    "inputs list": (lambda: _lenet().run([1, 2]), InputError, "dict of input name"),
    "input object": (lambda: _lenet().run({"data": object()}), InputError, "dtype object"),
    "input complex": (lambda: _lenet().run({"data": np.zeros((1, 1, 16, 16), np.complex64)}),
                      InputError, "dtype complex64"),
    "input name int": (lambda: _lenet().run({1: np.zeros((1, 1, 16, 16), np.float32)}),
                       InputError, "input names must be str"),
    "empty batch": (lambda: _lenet().run({"data": np.zeros((0, 1, 16, 16), np.float32)}),
                    InputError, "batch size 0"),
    "check tolerance": (lambda: _lenet().check({"data": np.zeros((1, 1, 16, 16), np.float32)}, tolerance="x"),
                        OptionError, "tolerance must be a number"),
    "check tolerance nan": (lambda: _lenet().check({"data": np.zeros((1, 1, 16, 16), np.float32)},
                                                   tolerance=float("nan")),
                            OptionError, "tolerance must be a finite number"),
    "caffe device": (lambda: _lenet().run_caffe({"data": np.zeros((1, 1, 16, 16), np.float32)}, device="x"),
                     OptionError, "whole number"),
}


@pytest.mark.parametrize("name", sorted(API_CALLS))
def test_python_api_arguments_of_the_wrong_type_get_the_projects_errors(name):
    call, error, says = API_CALLS[name]
    with pytest.raises(error, match=says) as raised:
        call()
    assert isinstance(raised.value, HybridInferError)


# --- verdicts ---------------------------------------------------------------------------------

def test_relative_l2_never_passes_what_was_not_compared():
    x = np.random.default_rng(7).standard_normal((2, 5)).astype(np.float32)
    nan = np.full_like(x, np.nan)
    assert relative_l2(nan, nan) == float("inf")  # all NaN on both sides: nothing was compared
    assert relative_l2(np.where(x > 0, np.nan, x), x) == float("inf")  # NaN where Caffe has numbers
    assert relative_l2(x, np.where(x > 0, np.nan, x)) == float("inf")
    assert relative_l2(x[:1], x) == float("inf")  # shapes differ: never broadcast
    same = np.where(x > 0, np.nan, x)
    assert relative_l2(same, same) == 0.0  # NaN in the same places, beside matching numbers
    row = compare_outputs({"y": nan}, {"y": nan})[0]
    assert row.rel_l2 == float("inf") and "no finite value" in row.note


NAN_NET = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "root" type: "Power" bottom: "conv" top: "root" power_param { power: 0.5 scale: 0 shift: -1 } }
'''


def test_all_nan_outputs_do_not_pass_check(make_prototxt, capsys):
    path = str(make_prototxt(NAN_NET))
    assert main(["run", path, "--random-weights", "1", "--min-segment-size", "1", "--check"]) == 1
    out = capsys.readouterr().out
    assert "root: max abs error 0, relative L2 inf ABOVE" in out and "no finite value" in out
    assert main(["diff", path, "--random-weights", "1", "--min-segment-size", "1"]) == 1
    assert "first value above relative L2 0.0001: root" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--engine-cache", "~nosuchuser_hybrid/c"], "engine-cache: ~nosuchuser_hybrid/c: '~nosuchuser_hybrid' cannot be "
                                                  "expanded (no such user, or no home folder)"),
    (["--engine-cache", ""], "argument --engine-cache: expected a folder name, not an empty string"),
    (["--input-shape", "data=1x1x16x16", "--input-shape", "data=2x1x16x16"],
     "--input-shape gives 'data' twice (1x1x16x16 and 2x1x16x16); give each input one shape"),
    (["--mean", "1", "2"], "--mean has 2 values; input 'data' has 1 channels"),
    (["--input", ""], "--input : no file name given"),
    (["--input", "a\nb.npy"], "input file 'a\\nb.npy' does not exist"),
    (["--input", "dta=x.npy"], "--input dta=x.npy: 'dta' is not an input of"),
    (["-o", "new.npz/"], "'new.npz/' ends in '/', so it names a folder; give a file name"),
])
def test_more_options_are_refused_on_one_line(capsys, args, says):
    try:
        status = main(["run", *LENET, *args])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    assert status == 2
    assert says in _error_line(capsys)


@pytest.mark.parametrize("variable, value, says", [
    ("HYBRID_INFER_ENGINE_CACHE", "~nosuchuser_hybrid/c", "HYBRID_INFER_ENGINE_CACHE ~nosuchuser_hybrid/c: "
                                                          "'~nosuchuser_hybrid' cannot be expanded"),
    ("HYBRID_INFER_TENSORRT", "bogus", "HYBRID_INFER_TENSORRT=bogus: unknown TensorRT module"),
])
def test_bad_environment_variables_are_named(capsys, monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    assert main(["build", PROTOTXT, "--random-weights", "1"]) == 2
    assert says in _error_line(capsys)


def test_partition_spec_fallback_without_names_is_refused(capsys):
    assert main(["compare", *LENET, "--partition", "fallback=+", "--runs", "1", "--warmup", "0"]) == 2
    assert "fallback needs layer names or types joined by '+', with no empty name" in _error_line(capsys)


def test_blob_names_holding_equals_signs(make_prototxt, tmp_path, capsys):
    """--input and --input-shape split NAME=... where the name is an input of the model (a
    blob may be called "a=b"), and a file name may hold '=' too."""
    path = make_prototxt('layer { name: "in" type: "Input" top: "a=b" input_param { shape { dim: 1 dim: 3 } } }\n'
                         'layer { name: "t" type: "TanH" bottom: "a=b" top: "t" }\n')
    x = np.random.default_rng().standard_normal((2, 3)).astype(np.float32)
    np.save(tmp_path / "x=1.npy", x)
    for spec in (f"a=b={tmp_path / 'x=1.npy'}", str(tmp_path / "x=1.npy")):
        out = tmp_path / "out.npz"
        assert main(["run", str(path), "--random-weights", "0", "--input-shape", "a=b=2x3", "--input", spec,
                     "-o", str(out)]) == 0
        np.testing.assert_allclose(np.load(out)["t"], np.tanh(x), rtol=1e-6, atol=1e-7)


def test_values_beyond_float32_are_refused_not_turned_into_inf(capsys, tmp_path):
    np.save(tmp_path / "big.npy", np.full((1, 1, 16, 16), 1e300))
    assert main(["run", *LENET, "--input", str(tmp_path / "big.npy")]) == 2
    assert "holds 1e+300, beyond the float32 range" in _error_line(capsys)
    with hybrid_infer.load(PROTOTXT, WEIGHTS) as net:
        with pytest.raises(InputError, match=r"input 'data': holds -1e\+200, beyond the float32 range"):
            net.run({"data": np.full((1, 1, 16, 16), -1e200)})
