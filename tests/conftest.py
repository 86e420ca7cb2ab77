"""Shared test fixtures: where third-party models live, and nets from prototxt text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
GRAPHS = REPO / "graphs"


@pytest.fixture(autouse=True, scope="session")
def private_engine_cache(tmp_path_factory: pytest.TempPathFactory):
    """Engines and measured engine choices go to this test session's own folder (inherited by
    CLI subprocesses), never to the user's cache: tests start from nothing and leave nothing."""
    from hybrid_infer.engines.engine_cache import ENV_DIR
    patch = pytest.MonkeyPatch()
    patch.setenv(ENV_DIR, str(tmp_path_factory.mktemp("engine-cache")))
    yield
    patch.undo()


#: The CPU engines that run TensorRT segments here; conformance tests run on each.
CONFORMANCE_ENGINES = ("onnxruntime", "openvino")


def require_engine(name: str) -> str:
    """``name`` if that CPU engine can run here; otherwise skip the test with the reason."""
    from hybrid_infer.executor.engine_choice import CANDIDATES
    ok, reason = CANDIDATES[name].available()
    if not ok:
        pytest.skip(f"{name} cannot run here: {reason}")
    return name


@pytest.fixture(params=CONFORMANCE_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each CPU engine in turn; one that cannot run here skips with its reason."""
    return require_engine(request.param)


@pytest.fixture
def shared_models() -> Path:
    """../shared/models, or skip: those third-party models are test data outside the repo."""
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"{SHARED_MODELS} is absent: third-party Caffe models are not available here")
    return SHARED_MODELS


@pytest.fixture
def make_prototxt(tmp_path: Path):
    """Write prototxt text to a file and return its path."""
    counter = iter(range(10**6))

    def write(text: str, name: str = "") -> Path:
        path = tmp_path / f"{name or 'net'}_{next(counter)}.prototxt"
        path.write_text(text)
        return path
    return write


@pytest.fixture(scope="session")
def rtx():
    """The TensorRT-RTX module (its builder runs without a GPU), or skip saying why it is missing."""
    from hybrid_infer.engines import trt_api
    from hybrid_infer.errors import EnvironmentProblem
    try:
        return trt_api.load("tensorrt_rtx")
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))
