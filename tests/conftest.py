"""Shared test fixtures: where third-party models live, and nets from prototxt text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
GRAPHS = REPO / "graphs"


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
