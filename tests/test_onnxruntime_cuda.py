"""ONNX Runtime's CUDA provider as the device engine for TensorRT segments: per model against
pure Caffe, tensors handed to and from Caffe GPU segments by device pointer (host copies
counted), CUDA graphs on and off. Tests marked ``gpu`` skip, with the reason, where
onnxruntime-gpu or a GPU is missing; the refusal paths run everywhere."""
from __future__ import annotations

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.api import HybridNet
from conftest import GRAPHS
from hybrid_infer.engines.onnxruntime_cuda_engine import OnnxRuntimeCudaEngine, cuda_provider_available
from hybrid_infer.errors import EnvironmentProblem, OptionError
from hybrid_infer.executor.hybrid_executor import DEVICE_POINTER, DEVICE_TO_HOST, HOST_TO_DEVICE, OUTPUT
from hybrid_infer.metrics import relative_l2
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

from test_caffe_gpu import MODELS, _inputs, _load, _max_error

HYBRID_TOLERANCE = 1e-4


def _gpu_for_onnxruntime() -> None:
    ok, reason = cuda_provider_available()
    if not ok:
        pytest.skip(f"no ONNX Runtime CUDA provider: {reason}")
    try:
        from hybrid_infer.engines.caffe_gpu_engine import use_gpu
        use_gpu(0)
    except EnvironmentProblem as exc:
        pytest.skip(f"no GPU for Caffe beside ONNX Runtime: {exc}")


@pytest.fixture
def cuda_gpu(monkeypatch):
    _gpu_for_onnxruntime()
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_gpu")
@pytest.mark.parametrize("folder,relpath,weights,shape", MODELS, ids=[m[1] for m in MODELS])
def test_onnxruntime_cuda_segments_match_pure_caffe(folder, relpath, weights, shape):
    plain = _load(folder, relpath, weights, shape, engine="onnxruntime-cuda", device=0)
    # the logits before each final Softmax too: saturated probabilities would hide errors
    net = HybridNet(plain.model, engine="onnxruntime-cuda", device=0, outputs=plain.outputs_with_logits())
    kinds = {se.engine.kind for se in net.segment_engines if se.segment.backend == TENSORRT}
    assert kinds == {"onnxruntime-cuda"}, [se.fallback_note for se in net.segment_engines]
    for batch in (1, 3):
        x = _inputs(net, batch)
        error = _max_error(net.run(x), net.run_caffe(x))
        assert error <= HYBRID_TOLERANCE, f"batch {batch}: relative L2 {error:.3g}"
    net.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_gpu")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_chain_onnxruntime_cuda_caffe_gpu_onnxruntime_cuda_copies_nothing_to_the_host(cuda_graphs):
    net = hybrid_infer.load(GRAPHS / "python_layer_net" / "deploy.prototxt", random_weights=3,
                            engine="onnxruntime-cuda", device=0, cuda_graphs=cuda_graphs)
    assert [s.backend for s in net.partition.segments] == [TENSORRT, CAFFE, TENSORRT]
    x = _inputs(net, 4)
    got, want = net.run(x), net.run_caffe(x)
    assert _max_error(got, want) <= HYBRID_TOLERANCE
    got = net.run(x)  # steady state: buffers and (with graphs) captured graphs reused
    assert _max_error(got, want) <= HYBRID_TOLERANCE
    kinds = [se.engine.kind for se in net.segment_engines]
    assert kinds == ["onnxruntime-cuda", "caffe-gpu", "onnxruntime-cuda"]
    between = [h for h in net.handoffs() if h.source.startswith("segment") and h.target.startswith("segment")]
    assert len(between) == 2 and all(h.path == DEVICE_POINTER and h.copied_bytes == 0 for h in between)
    assert [h.path for h in net.handoffs() if h.source == "input"] == [HOST_TO_DEVICE]
    assert {h.path for h in net.handoffs() if h.target == OUTPUT} == {DEVICE_TO_HOST}
    engines = [se.engine for se in net.segment_engines]
    # the input up once per run, the output down once per run, nothing else (two runs)
    assert sum(e.transfers.uploads for e in engines) == 2
    assert sum(e.transfers.downloads for e in engines) == 2
    # (the Caffe segment's own blobs are synced to the host inside Caffe: its Python layer computes there)
    # a smaller batch than the blobs were set up for: a lent buffer must not be read past its end
    small = _inputs(net, 1)
    assert _max_error(net.run(small), net.run_caffe(small)) <= HYBRID_TOLERANCE
    if cuda_graphs:
        assert all(e.cuda_graph for e in engines if e.kind == "onnxruntime-cuda"), \
            [e.cuda_graph_note for e in engines if e.kind == "onnxruntime-cuda"]
    net.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_gpu")
def test_cuda_graphs_on_and_off_give_the_same_result():
    path = GRAPHS / "lenet_digits" / "deploy.prototxt"
    weights = GRAPHS / "lenet_digits" / "lenet_digits.caffemodel"
    x = np.concatenate([np.load(p) for p in sorted((GRAPHS / "lenet_digits" / "samples").glob("*.npy"))])
    results = {}
    for graphs in (True, False):
        net = hybrid_infer.load(path, weights, engine="onnxruntime-cuda", cuda_graphs=graphs)
        (engine,) = [se.engine for se in net.segment_engines]
        assert engine.cuda_graph is graphs or not graphs, engine.cuda_graph_note
        results[graphs] = [net.run({"data": x[:n]})["prob"] for n in (10, 3, 10)]
        net.close()
    for on, off in zip(results[True], results[False]):
        assert relative_l2(on, off) <= 1e-6


def test_onnxruntime_cuda_refusal_is_clear_without_the_provider():
    ok, reason = cuda_provider_available()
    if ok:
        pytest.skip("this ONNX Runtime has the CUDA provider: the refusal path cannot be shown here")
    with pytest.raises(OptionError, match="--engine onnxruntime-cuda cannot run here: .*use --engine onnxruntime"):
        hybrid_infer.load(GRAPHS / "lenet_digits" / "deploy.prototxt", random_weights=1,
                          engine="onnxruntime-cuda").run({"data": np.ones((1, 1, 16, 16), np.float32)})
    import onnx
    with pytest.raises(EnvironmentProblem, match="onnxruntime-gpu|no GPU is visible here"):
        OnnxRuntimeCudaEngine(onnx.ModelProto())


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_gpu")
def test_auto_takes_onnxruntime_cuda_where_no_tensorrt_runtime_supports_the_gpu():
    from hybrid_infer.engines.tensorrt_engine import runtime_available
    if runtime_available(None)[0]:
        pytest.skip("a TensorRT runtime supports this GPU: auto takes TensorRT here")
    net = hybrid_infer.load(GRAPHS / "python_layer_net" / "deploy.prototxt", random_weights=3, device=0)
    x = _inputs(net, 2)
    assert _max_error(net.run(x), net.run_caffe(x)) <= HYBRID_TOLERANCE
    assert [se.engine.kind for se in net.segment_engines] == ["onnxruntime-cuda", "caffe-gpu", "onnxruntime-cuda"]
    assert "TensorRT cannot run here" in net.engine_reason and "CUDA provider" in net.engine_reason
    net.close()
