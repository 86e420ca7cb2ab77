"""The engine cache as found on disk (issue 13, kind 3), with real TensorRT-RTX builds.

Every damaged or replaced entry is a miss with its reason and is rebuilt over, never read
blindly (a FIFO would block, a link to a zero device would never end); an unusable cache
folder is reported before any build. Engines are the tiny ones of test_tensorrt_build.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from hybrid_infer.cli.main import main
from hybrid_infer.engines import engine_cache, trt_api
from hybrid_infer.engines.engine_cache import EngineCache
from hybrid_infer.errors import EnvironmentProblem, OptionError

from child_process import public_folder, run_in_child
from conftest import GRAPHS
from test_tensorrt_build import SETTINGS, gemm

IS_ROOT = os.geteuid() == 0
MODEL = gemm()


@pytest.fixture(scope="module")
def rtx() -> trt_api.TrtApi:
    return trt_api.load("tensorrt_rtx")


@pytest.fixture
def entry(rtx, tmp_path):
    """A cache holding one real entry: (cache, plan path, sidecar path, sidecar dict)."""
    cache = EngineCache(tmp_path / "cache")
    _, lookup = cache.get_or_build(MODEL, SETTINGS, api=rtx)
    meta = lookup.plan_path.with_suffix(".json")
    return cache, lookup.plan_path, meta, json.loads(meta.read_text())


def _lookup_within(cache: EngineCache, key: str, seconds: float = 20.0):
    """``cache.lookup(key)``, failing the test (instead of hanging it) if it blocks."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(cache.lookup(key)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"lookup blocked for {seconds} s"
    return result[0]


def _replace_with(path: Path, kind: str, tmp_path: Path) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "zero device":
        if not IS_ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(tmp_path / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # an endless file of our own
        path.symlink_to(tmp_path / "zero")
    elif kind == "link to a good copy":
        (tmp_path / "copy").write_bytes(b"{}")
        path.symlink_to(tmp_path / "copy")


def _changed(**fields) -> Callable[[dict], bytes]:
    """A sidecar like the good one with ``fields`` replaced (``engine`` fields merged in)."""
    def change(good: dict) -> bytes:
        data = dict(good)
        for key, value in fields.items():
            data[key] = {**good["engine"], **value} if key == "engine" and isinstance(value, dict) else value
        return json.dumps(data).encode()
    return change


SIDECARS = {
    "a JSON list": (lambda good: b"[1, 2]", "sidecar from another cache format"),
    "a JSON string": (lambda good: b'"x"', "sidecar from another cache format"),
    "not UTF-8": (lambda good: b"\xff\xfe{", "unreadable sidecar"),
    "plan_size a string": (_changed(plan_size="12"), "plan size or checksum missing or of the wrong type"),
    "plan_size true": (_changed(plan_size=True), "plan size or checksum missing or of the wrong type"),
    "plan_size enormous": (_changed(plan_size=10**15), "plan size or checksum missing or of the wrong type"),
    "checksum a number": (_changed(plan_sha256=5), "plan size or checksum missing or of the wrong type"),
    "engine a list": (_changed(engine=[]), "engine metadata is a list, not an object"),
    "input names a string": (_changed(engine={"input_names": "abc"}), "field 'input_names' has the wrong type"),
    "engine field missing": (lambda good: json.dumps({**good, "engine": {"module": "x"}}).encode(),
                             "engine metadata has no"),
}


@pytest.mark.parametrize("name", sorted(SIDECARS))
def test_a_sidecar_of_the_wrong_shape_is_a_miss_and_rebuilt(rtx, entry, name):
    cache, plan, meta, good = entry
    change, reason = SIDECARS[name]
    meta.write_bytes(change(good))
    lookup, built = _lookup_within(cache, good["key"])
    assert built is None and not lookup.hit and reason in lookup.reason, lookup.reason
    rebuilt, again = cache.get_or_build(MODEL, SETTINGS, api=rtx)
    assert not again.hit and rebuilt.plan_size > 0
    assert cache.lookup(good["key"])[0].hit


@pytest.mark.parametrize("which", ["plan", "sidecar"])
@pytest.mark.parametrize("kind, says", [("fifo", "is a FIFO"), ("folder", "is a folder"),
                                        ("zero device", "symbolic link"), ("link to a good copy", "symbolic link")])
def test_special_files_in_the_cache_are_not_read(rtx, entry, tmp_path, which, kind, says):
    cache, plan, meta, good = entry
    _replace_with(plan if which == "plan" else meta, kind, tmp_path)
    lookup, built = _lookup_within(cache, good["key"])
    assert built is None and says in lookup.reason, lookup.reason
    if kind == "folder":  # an empty folder cannot be replaced by a file: a clear error, not a crash
        with pytest.raises(EnvironmentProblem, match="cannot write there"):
            cache.get_or_build(MODEL, SETTINGS, api=rtx)
        return
    cache.get_or_build(MODEL, SETTINGS, api=rtx)  # rebuilt over the junk entry
    assert cache.lookup(good["key"])[0].hit
    if kind == "zero device":
        assert stat.S_ISCHR(os.lstat(tmp_path / "zero").st_mode)  # the device itself is untouched


def test_a_plan_whose_size_differs_is_not_read(rtx, entry):
    cache, plan, meta, good = entry
    plan.write_bytes(plan.read_bytes() * 3)
    lookup, _ = cache.lookup(good["key"])
    assert lookup.reason.startswith("plan truncated or replaced")


@pytest.mark.parametrize("where, says", [("file/cache", "Not a directory"), ("c" * 300, "File name too long"),
                                         ("/proc/self/cache", "No such file or directory")])
def test_an_unusable_cache_folder_is_reported_before_building(rtx, tmp_path, monkeypatch, where, says):
    (tmp_path / "file").write_text("x")
    folder = Path(where) if where.startswith("/") else tmp_path / where

    def no_build(*args, **kwargs):
        raise AssertionError("built although the cache cannot store the result")
    monkeypatch.setattr(engine_cache, "build_engine", no_build)
    with pytest.raises(EnvironmentProblem, match=rf"engine cache .*{says}.*--engine-cache DIR"):
        EngineCache(folder).get_or_build(MODEL, SETTINGS, api=rtx)


@pytest.mark.skipif(not IS_ROOT, reason="dropping to another user needs root")
def test_a_cache_folder_without_permissions_is_reported():
    with public_folder() as parent:
        locked = parent / "locked"
        locked.mkdir(mode=0o700)
        assert run_in_child(lambda: EngineCache(locked).check_directory(), as_nobody=True) == \
            f"EnvironmentProblem: engine cache {locked}: not a writable folder; pass --engine-cache DIR or set " \
            "HYBRID_INFER_ENGINE_CACHE to a writable folder"
        assert run_in_child(lambda: EngineCache(locked / "sub").check_directory(), as_nobody=True) == \
            f"EnvironmentProblem: engine cache {locked / 'sub'}: Permission denied; pass --engine-cache DIR or set " \
            "HYBRID_INFER_ENGINE_CACHE to a writable folder"


def test_build_command_rebuilds_over_a_damaged_entry(tmp_path, capsys):
    lenet = GRAPHS / "lenet_digits"
    args = ["build", str(lenet / "deploy.prototxt"), "--weights", str(lenet / "lenet_digits.caffemodel"),
            "--engine-cache", str(tmp_path), "--tensorrt-module", "tensorrt_rtx"]
    assert main(args) == 0
    plan = next(tmp_path.glob("*.plan"))
    plan.unlink()
    os.mkfifo(plan)
    assert main(args) == 0
    assert "built in" in capsys.readouterr().out and stat.S_ISREG(os.lstat(plan).st_mode)


def test_engine_cache_directory_of_the_wrong_type_is_an_option_error():
    with pytest.raises(OptionError, match="engine cache directory must be a file path"):
        EngineCache(5)  # type: ignore[arg-type]


def test_a_sidecar_claiming_a_plan_too_large_for_memory_is_a_miss_every_time(rtx, entry):
    """The review's poisoned entry: a sidecar claiming 12 GiB and a (sparse) plan of that size.
    Read whole it meant out of memory on every run; it is a miss, and rebuilt over."""
    cache, plan, meta, good = entry
    size = 12 * 2**30
    meta.write_text(json.dumps({**good, "plan_size": size}))
    os.truncate(plan, size)

    def look() -> None:
        lookup, built = cache.lookup(good["key"])
        raise RuntimeError(f"hit={lookup.hit} built={built is not None} reason={lookup.reason}")
    said = run_in_child(look, extra_address_space=2 * 2**30)
    assert f"hit=False built=False reason=plan of {size} bytes does not fit in memory" in said, said
    cache.get_or_build(MODEL, SETTINGS, api=rtx)
    assert cache.lookup(good["key"])[0].hit and plan.stat().st_size < 2**20


def test_a_corrupt_plan_is_checked_in_chunks_and_missed(rtx, entry):
    cache, plan, meta, good = entry
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    lookup, built = cache.lookup(good["key"])
    assert built is None and lookup.reason == "plan checksum mismatch (corrupt file)"


def test_writes_killed_midway_are_swept_from_the_cache(tmp_path):
    """Staged files carry their writer's process id: those of dead writers, and any older than
    an hour, are removed when the cache is next used; a live writer's are left alone."""
    folder = tmp_path / "cache"
    folder.mkdir()
    dead = _dead_pid()
    names = {"dead": f".k.plan.{dead}.abcdefgh.tmp", "live": f".k.plan.{os.getpid()}.abcdefgh.tmp",
             "old": f".k.json.{os.getpid()}.ijklmnop.tmp", "other": "k.plan"}
    for name in names.values():
        (folder / name).write_bytes(b"x")
    old = folder / names["old"]
    os.utime(old, (old.stat().st_atime - 2 * 3600, old.stat().st_mtime - 2 * 3600))
    EngineCache(folder).check_directory()
    assert sorted(os.listdir(folder)) == sorted([names["live"], names["other"]])


def _dead_pid() -> int:
    """The id of a process that has ended."""
    import subprocess
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
