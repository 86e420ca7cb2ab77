"""``--engine auto`` without a TensorRT runtime: each TensorRT segment runs in the fastest
installed CPU engine (ONNX Runtime, OpenVINO), measured once on the user's shapes and
remembered in the engine cache; named engines, ``compare`` side by side, and the CLI's
account of what was chosen and why. No speed is asserted: only that the choice is the
measured minimum, is reused, and never changes Caffe's answer."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.analysis.partition_spec import PartitionSpec, parse_spec, with_engines
from hybrid_infer.api import HybridNet
from hybrid_infer.cli.main import main
from hybrid_infer.engines.engine_cache import EngineCache
from hybrid_infer.errors import InputError, OptionError
from hybrid_infer.executor.engine_choice import AUTO, CpuSettings
from hybrid_infer.executor.engine_factory import ENGINES, resolve_engine
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import TENSORRT

from conftest import CONFORMANCE_ENGINES, GRAPHS, require_engine

PYTHON_NET = GRAPHS / "python_layer_net/deploy.prototxt"
LENET = [str(GRAPHS / "lenet_digits/deploy.prototxt"), "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")]


@pytest.fixture
def cpu_auto(monkeypatch):
    """Both CPU engines installed and no TensorRT runtime: ``auto`` measures them."""
    for name in CONFORMANCE_ENGINES:
        require_engine(name)
    if resolve_engine("auto")[0] != AUTO:
        pytest.skip("a TensorRT runtime can run here, so auto picks TensorRT")
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))


def _records(cache: EngineCache) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache.directory / "choices").glob("*.json"))]


def _inputs(net: HybridNet, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    return {n: rng.standard_normal((batch, *s[1:])).astype(np.float32) for n, s in net.input_shapes().items()}


def _tensorrt_segments(net: HybridNet):
    return [se for se in net.segment_engines if se.segment.backend == TENSORRT]


def test_auto_measures_each_segment_once_then_reuses_the_choice(cpu_auto, tmp_path):
    cache = EngineCache(tmp_path)
    net = hybrid_infer.load(PYTHON_NET, random_weights=3, min_segment_size=1, engine_cache=cache)
    x = _inputs(net, 3)
    got, want = net.run(x), net.run_caffe(x)
    assert all(relative_l2(got[b], want[b]) <= 1e-4 for b in want)
    assert "fastest of onnxruntime, openvino" in net.engine_reason
    chosen = _tensorrt_segments(net)
    assert len(chosen) == 2
    for se in chosen:
        assert se.engine.kind in CONFORMANCE_ENGINES
        assert se.choice_note.startswith(f"{se.engine.kind}, the fastest at batch 3: ")
        assert "onnxruntime" in se.choice_note and "openvino" in se.choice_note and "(measured now)" in se.choice_note
    records = _records(cache)
    assert len(records) == 2
    for record in records:
        assert set(record["median_ms"]) == set(CONFORMANCE_ENGINES) and record["batch"] == 3
        assert record["engine"] == min(record["median_ms"], key=record["median_ms"].get)
        assert all(ms > 0 for ms in record["median_ms"].values())
    again = HybridNet(net.model, min_segment_size=1, engine_cache=cache)
    again.run(x)
    for first, second in zip(chosen, _tensorrt_segments(again)):
        assert second.engine.kind == first.engine.kind
        assert "cached)" in second.choice_note
    assert _records(cache) == records


@pytest.mark.parametrize("change", ["batch", "threads"])
def test_other_shapes_or_threads_are_measured_again(cpu_auto, tmp_path, change):
    cache = EngineCache(tmp_path)
    net = hybrid_infer.load(PYTHON_NET, random_weights=3, min_segment_size=1, engine_cache=cache)
    net.run(_inputs(net, 2))
    assert len(_records(cache)) == 2
    settings = CpuSettings(threads=1) if change == "threads" else None
    other = HybridNet(net.model, min_segment_size=1, engine_cache=cache, cpu_settings=settings)
    other.run(_inputs(net, 4 if change == "batch" else 2))
    assert all("(measured now)" in se.choice_note for se in _tensorrt_segments(other))
    assert len(_records(cache)) == 4


def test_a_damaged_record_is_measured_again_and_rewritten(cpu_auto, tmp_path, caplog):
    cache = EngineCache(tmp_path)
    net = hybrid_infer.load(PYTHON_NET, random_weights=3, min_segment_size=1, engine_cache=cache)
    x = _inputs(net, 1)
    net.run(x)
    paths = sorted((tmp_path / "choices").glob("*.json"))
    paths[0].write_text('{"format": 1, "engine": ')
    paths[1].write_text(json.dumps({**json.loads(paths[1].read_text()), "engine": "no-such-engine"}))
    again = HybridNet(net.model, min_segment_size=1, engine_cache=cache)
    with caplog.at_level(logging.WARNING, logger="hybrid_infer"):
        got = again.run(x)
    assert all("(measured now)" in se.choice_note for se in _tensorrt_segments(again))
    assert sum("measuring again" in r.message for r in caplog.records) == 2
    assert all(r["engine"] in CONFORMANCE_ENGINES for r in _records(cache))
    want = again.run_caffe(x)
    assert all(relative_l2(got[b], want[b]) <= 1e-4 for b in want)


@pytest.mark.parametrize("engine", CONFORMANCE_ENGINES)
def test_a_named_engine_runs_every_segment_without_measuring(engine, monkeypatch):
    require_engine(engine)
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    net = hybrid_infer.load(PYTHON_NET, random_weights=3, min_segment_size=1, engine=engine)
    net.run(_inputs(net, 1))
    assert [se.engine.kind for se in _tensorrt_segments(net)] == [engine, engine]
    assert all(se.choice_note is None for se in net.segment_engines)
    assert net.engine_reason == "asked for"


def test_engine_names_and_mistakes():
    assert ENGINES == ("auto", "onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt", "caffe")
    with pytest.raises(OptionError, match="unknown engine 'fastest'; choose one of auto, onnxruntime, openvino"):
        resolve_engine("fastest")


def test_specs_name_their_engine_and_expand_side_by_side():
    spec = parse_spec("min=1,engine=openvino")
    assert spec == PartitionSpec(min_segment_size=1, engine="openvino")
    assert spec.label == "profile=tensorrt,min=1,engine=openvino" and parse_spec(spec.label) == spec
    with pytest.raises(OptionError, match="unknown engine 'ncnn'"):
        parse_spec("engine=ncnn")
    expanded = with_engines([parse_spec("caffe"), PartitionSpec(), spec], ["onnxruntime", "openvino"])
    assert [s.label for s in expanded] == ["caffe", "profile=tensorrt,min=3,engine=onnxruntime",
                                           "profile=tensorrt,min=3,engine=openvino", spec.label]


def test_compare_shows_the_engines_side_by_side(cpu_auto, tmp_path, capsys):
    report = tmp_path / "compare.json"
    assert main(["compare", *LENET, "--runs", "2", "--warmup", "0", "--json", str(report)]) == 0
    rows = {row["spec"]: row for row in json.loads(report.read_text())["partitions"]}
    for name in CONFORMANCE_ENGINES:
        row = rows[f"profile=tensorrt,min=3,engine={name}"]
        assert row["within_tolerance"] and row["latency_median_ms"] > 0
    assert any(note.startswith("segment 0: chose ") for note in rows["profile=tensorrt,min=3"]["notes"])
    status = main(["compare", *LENET, "--runs", "1", "--warmup", "0", "--partition", "min=1",
                   "--engine", "onnxruntime", "openvino", "auto"])
    out = capsys.readouterr().out
    assert status == 0
    for name in ("onnxruntime", "openvino", "auto"):
        assert f"profile=tensorrt,min=1,engine={name}" in out


def test_run_says_what_it_chose_and_why(cpu_auto, tmp_path, capsys):
    args = ["run", *LENET, "--batch", "2", "--engine-cache", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "fastest of onnxruntime, openvino, measured on its shapes" in first
    assert "(chose " in first and "the fastest at batch 2" in first and "(measured now)" in first
    assert main(args) == 0
    assert "cached)" in capsys.readouterr().out


def test_bf16_is_reported_as_reduced_precision_with_its_error(capsys):
    require_engine("openvino")
    from hybrid_infer.engines.openvino_engine import bf16_supported
    status = main(["run", *LENET, "--engine", "openvino", "--bf16"])
    captured = capsys.readouterr()
    if not bf16_supported():
        assert status == 2 and "avx512_bf16 or AMX" in captured.err
        return
    assert status == 0
    report = captured.out.split("reduced precision: segment 0 (openvino, BF16); error against pure Caffe")[1]
    assert "prob: max abs error" in report and "ip2 (input of Softmax 'prob')" in report
    assert "OK" not in report and "ABOVE" not in report  # measured, not judged, without --check


@pytest.mark.parametrize("args,message", [
    (["--engine", "onnxruntime", "--bf16"], "--bf16 applies to OpenVINO"),
])
def test_cpu_option_mistakes_are_one_line_errors(args, message, capsys):
    assert main(["run", *LENET, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("threads,message", [("-1", "must be 0 or more, not -1"), ("5000", "must be at most 4096")])
def test_thread_counts_out_of_range_are_refused_when_parsed(threads, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", *LENET, "--threads", threads])
    assert exited.value.code == 2 and f"argument --threads: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("settings,message", [
    (dict(threads=-1), "threads must be 0 or more"), (dict(threads=True), "threads must be a whole number"),
    (dict(threads=1.5), "threads must be a whole number"), (dict(bf16="yes"), "bf16 must be True or False"),
])
def test_cpu_settings_are_checked(settings, message):
    with pytest.raises(OptionError, match=message):
        CpuSettings(**settings)


def test_bf16_with_a_cpu_engine_other_than_openvino_is_refused_in_the_api():
    with pytest.raises(OptionError, match="BF16 .* applies to OpenVINO"):
        hybrid_infer.load(PYTHON_NET, random_weights=1, engine="onnxruntime", cpu_settings=CpuSettings(bf16=True))


FIXED_BATCH = """name: "fixed_batch_reshape"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "rs" type: "Reshape" bottom: "conv" top: "rs" reshape_param { shape { dim: 2 dim: -1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "rs" top: "fc" inner_product_param { num_output: 5 } }
"""


@pytest.mark.parametrize("engine", CONFORMANCE_ENGINES)
def test_a_net_fixed_at_its_batch_is_refused_at_another_on_every_engine(engine, make_prototxt):
    """OpenVINO ran the Reshape that writes batch 2 at batch 3 and dropped the third image;
    every engine now refuses before running, with Caffe's reason and the way out."""
    require_engine(engine)
    net = hybrid_infer.load(make_prototxt(FIXED_BATCH), random_weights=1, engine=engine)
    x = np.random.default_rng().standard_normal((3, 3, 4, 4)).astype(np.float32)
    with pytest.raises(InputError, match=r"'rs' \(Reshape\) writes the batch axis as 2.*--input-shape"):
        net.run({"data": x})
    assert relative_l2(net.run({"data": x[:2]})["fc"], net.run_caffe({"data": x[:2]})["fc"]) <= 1e-5


EMBED = """name: "embed_internal"
input: "data"
input_shape { dim: 2 dim: 4 }
layer { name: "shift" type: "Power" bottom: "data" top: "idx" power_param { shift: 2 } }
layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { input_dim: 4 num_output: 3 } }
"""


def test_embed_never_runs_on_openvino(make_prototxt):
    """OpenVINO's Gather gives zeros for an index outside the table where Caffe stops: asked for,
    OpenVINO leaves the Embed layer to Caffe; auto takes ONNX Runtime and says why."""
    require_engine("openvino")
    path = make_prototxt(EMBED)
    x = {"data": np.array([[0, 1, -1, 1], [-2, -1, 0, 1]], np.float32)}  # indices 2, 3, 1, 3, 0, 1, 2, 3
    net = hybrid_infer.load(path, random_weights=1, engine="openvino", min_segment_size=1)
    assert relative_l2(net.run(x)["emb"], net.run_caffe(x)["emb"]) <= 1e-6
    segment_of = {name: se for se in net.segment_engines for name in se.segment.layers}
    assert segment_of["emb"].engine.kind == "caffe" and "OpenVINO gives zeros" in net.partition.fallback_reasons["emb"]
    bad = {"data": np.array([[0, 1, 3, 1], [-2, -1, 0, 1]], np.float32)}  # index 5: outside the table of 4
    with pytest.raises(InputError, match="'emb' \\(Embed\\) takes whole numbers in \\[0, 4\\)"):
        net.run(bad)  # checked where the Caffe segment receives it (Caffe's Embed would read past its table)
    if resolve_engine("auto")[0] == AUTO:
        auto = hybrid_infer.load(path, random_weights=1, min_segment_size=1)
        auto.run(x)
        (se,) = [se for se in auto.segment_engines if "emb" in se.segment.layers]
        assert se.engine.kind == "onnxruntime" and "index outside the table" in se.choice_note
