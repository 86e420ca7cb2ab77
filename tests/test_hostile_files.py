"""Output and input files as a hostile user leaves them (issue 13, kinds 2 and 4).

Special files are real (FIFOs, sockets, and, as root, device nodes made with ``mknod`` in
the test's own folder; the real /dev is never touched). Runs go through the CLI in-process.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from hybrid_infer.cli.main import main
from hybrid_infer.errors import InputError, ModelError, OptionError
from hybrid_infer.files import write_atomically, write_files_atomically
from hybrid_infer.inputs import Preprocessing, load_input, read_labels
from hybrid_infer.model.caffemodel import read_caffemodel
from hybrid_infer.model.protofile import read_prototxt

from child_process import public_folder, run_in_child
from conftest import GRAPHS

LENET = [str(GRAPHS / "lenet_digits/deploy.prototxt"),
         "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel")]
IS_ROOT = os.geteuid() == 0


def _identity(path: Path) -> tuple:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"out.{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "device":
        if not IS_ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # a /dev/full of our own
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, says", [("fifo", "is a FIFO"), ("socket", "is a socket"),
                                        ("device", "is a character device"), ("folder", "is a folder")])
@pytest.mark.parametrize("command", ["run", "partition", "diff", "compare"])
def test_special_output_paths_are_refused_and_left_alone(tmp_path, capsys, kind, says, command):
    path = _special(tmp_path, kind)
    before = _identity(path)
    option = {"run": "-o", "partition": "-o", "diff": "--json", "compare": "--json"}[command]
    args = {"run": ["run", *LENET], "partition": ["partition", LENET[0]], "diff": ["diff", *LENET],
            "compare": ["compare", *LENET, "--partition", "caffe", "--runs", "1", "--warmup", "0"]}[command]
    assert main([*args, option, str(path)]) == 2
    line = _one_error_line(capsys)
    assert f"{option} {path}: {says}" in line
    assert _identity(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path, capsys):
    target = tmp_path / "real.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "latest.npz"
    link.symlink_to(target.name)
    assert main(["run", *LENET, "-o", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == target.name
    with np.load(target) as saved:
        assert saved["prob"].shape == (1, 10)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.npz", "real.npz"]


def test_a_link_to_a_fifo_is_refused(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "out.json").symlink_to("pipe")
    assert main(["partition", LENET[0], "--format", "json", "-o", str(tmp_path / "out.json")]) == 2
    assert "is a FIFO" in _one_error_line(capsys)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode) and (tmp_path / "out.json").is_symlink()


def test_new_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "new.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


@pytest.mark.parametrize("where, says", [
    ("file/out.npz", "Not a directory"), ("missing/out.npz", "does not exist"),
    ("/proc/self/out.npz", "cannot write"), ("o" * 300 + ".npz", "File name too long")])
def test_unwritable_places_are_clean_errors(tmp_path, capsys, where, says):
    (tmp_path / "file").write_text("x")
    path = where if where.startswith("/") else str(tmp_path / where)
    assert main(["run", *LENET, "-o", path]) == 2
    assert says in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_oserror_while_writing_is_an_option_error_and_leaves_nothing(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(OptionError, match=r"--json .*: cannot write there \(File name too long\)"):
        write_atomically(tmp_path / "sub" / ("x" * 250), b"{}", option="--json")  # the temporary name is longer
    assert list((tmp_path / "sub").iterdir()) == []


def test_export_writes_all_files_or_none(tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "manifest.json").mkdir()  # the manifest cannot be written: nothing may be
    assert main(["export", *LENET, "-o", str(out)]) == 2
    assert "manifest.json: is a folder" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    (out / "manifest.json").rmdir()
    assert main(["export", *LENET, "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_files = [s["onnx"] for s in manifest["segments"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *onnx_files])


def test_a_failure_between_staging_and_renaming_removes_the_new_files(tmp_path):
    """Staged files are renamed in order; if one rename fails, the ones already in place go."""
    (tmp_path / "b.onnx").mkdir()
    (tmp_path / "b.onnx" / "keep").write_text("x")  # a non-empty folder: os.replace over it fails
    files = {tmp_path / "a.onnx": b"a", tmp_path / "b.onnx": b"b", tmp_path / "manifest.json": b"{}"}
    with pytest.raises(OptionError, match="b.onnx"):
        write_files_atomically(files, owned_folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]


# --- input files ---------------------------------------------------------------------------

def _npy_with_header(shape: tuple, descr: str = "<f4", body: bytes = b"") -> bytes:
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones(3, np.float32))
    return buffer.getvalue()


SHAPE = (1, 1, 16, 16)
NPY_CASES = {
    "empty file": (b"", "not a readable .npy array"),
    "enormous header": (_npy_with_header((10**6, 10**6, 10**6), body=bytes(64)),
                        r"announces shape \(1000000, 1000000, 1000000\) .* holds 64 bytes of data"),
    "truncated data": (_saved(np.ones(SHAPE, np.float32))[:-10], "truncated or damaged"),
    "npz renamed": (_npz(), r"is a \.npz archive"),
    "0-d": (_saved(np.float32(2.5)), "0-d array"),
    "empty batch": (_saved(np.zeros((0, 1, 16, 16), np.float32)), "holds no values"),
    "integers": (_saved(np.ones(SHAPE, np.int64)), "holds int64 values"),
    "objects": (_saved(np.array([1, "a"], dtype=object)), "holds object values"),
    "bad magic": (b"\x93NUMPX\x01\x00" + bytes(64), "not a readable .npy array"),
}


@pytest.mark.parametrize("name", sorted(NPY_CASES))
def test_hostile_npy_files_are_clear_input_errors(tmp_path, name):
    data, says = NPY_CASES[name]
    path = tmp_path / "x.npy"
    path.write_bytes(data)
    with pytest.raises(InputError, match=says):
        load_input(path, SHAPE, Preprocessing())


def test_good_npy_files_load_exactly(tmp_path):
    array = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "c.npy", array)
    np.save(tmp_path / "f.npy", np.asfortranarray(array[0]))
    np.testing.assert_array_equal(load_input(tmp_path / "c.npy", SHAPE, Preprocessing()), array)
    np.testing.assert_array_equal(load_input(tmp_path / "f.npy", SHAPE, Preprocessing()), array)


@pytest.mark.parametrize("name, data, says", [
    ("bomb.png", _png(60000, 60000), "decompression bomb"),
    ("bomb2.png", _png(10000, 10000), "decompression bomb"),
    ("maxval0.pgm", b"P5\n4 4\n0\n" + bytes(16), "maxval must be greater than 0"),
    ("noise.png", bytes(range(256)), "cannot read this image"),
    ("empty.jpg", b"", "cannot read this image")])
def test_hostile_images_are_clear_input_errors(tmp_path, name, data, says):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=says):
        load_input(tmp_path / name, SHAPE, Preprocessing())


def test_resize_beyond_pillows_limit_is_refused_before_decoding(tmp_path):
    sample = next((GRAPHS / "lenet_digits/samples").glob("*.png"))
    with pytest.raises(InputError, match="more than the 89478485 Pillow decodes safely"):
        load_input(sample, (1, 1, 10000, 10000), Preprocessing())


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "folder"])
def test_special_input_files_are_refused_without_blocking(tmp_path, kind):
    path = _special(tmp_path, kind)
    renamed = path.with_name("x.npy")
    path.rename(renamed)
    with pytest.raises(InputError, match=r"is a .*, not a regular file"):
        load_input(renamed, SHAPE, Preprocessing())
    with pytest.raises(ModelError, match=r"is a .*, not a regular file"):
        read_prototxt(renamed)
    with pytest.raises(ModelError, match=r"is a .*, not a regular file"):
        read_caffemodel(renamed)


def test_too_long_and_looping_paths_are_clean_errors(tmp_path):
    loop = tmp_path / "loop.npy"
    loop.symlink_to(loop.name)
    with pytest.raises(InputError, match="Too many levels of symbolic links"):
        load_input(loop, SHAPE, Preprocessing())
    with pytest.raises(ModelError, match="File name too long"):
        read_prototxt(tmp_path / ("m" * 300))


@pytest.mark.skipif(not IS_ROOT, reason="dropping to another user needs root")
def test_unreadable_files_are_clean_errors():
    with public_folder() as folder:
        for name in ("x.npy", "labels.txt", "m.prototxt"):
            (folder / name).write_bytes(b"x")
            (folder / name).chmod(0o600)
        assert run_in_child(lambda: load_input(folder / "x.npy", SHAPE, Preprocessing()), as_nobody=True) == \
            f"InputError: input file '{folder / 'x.npy'}': cannot read it (Permission denied)"
        assert run_in_child(lambda: read_labels(folder / "labels.txt"), as_nobody=True) == \
            f"InputError: --labels '{folder / 'labels.txt'}': cannot read it (Permission denied)"
        assert run_in_child(lambda: read_prototxt(folder / "m.prototxt"), as_nobody=True) == \
            f"ModelError: prototxt '{folder / 'm.prototxt'}': cannot read it (Permission denied)"


@pytest.mark.parametrize("data, says", [
    (None, "does not exist"), ("folder", "is a folder"), (b"z\xe9ro\n", r"not UTF-8 text \(byte 0xe9 at offset 1\)")])
def test_bad_labels_files_are_refused_before_the_model_loads(tmp_path, capsys, data, says):
    path = tmp_path / "labels.txt"
    if data == "folder":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    assert main(["run", *LENET, "--labels", str(path)]) == 2
    assert re.search(says, _one_error_line(capsys))


def test_labels_with_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffzero\n one \n")
    assert read_labels(path) == ["zero", "one"]  # the final newline ends a line; it starts no class


def test_files_of_one_input_must_agree(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((1, 1, 16, 16), np.float32))
    np.save(tmp_path / "b.npy", np.ones((1, 1, 8, 8), np.float32))
    assert main(["run", *LENET, "--input", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 2
    assert "the files of one input must agree" in _one_error_line(capsys)


# --- the review's follow-ups (issue 13b) ------------------------------------------------------------

def test_outputs_never_overwrite_what_the_command_reads(tmp_path, capsys):
    """-o naming the prototxt, the weights (through a link), an input, or the labels is refused
    before anything is written, and every one of those files is left as it was."""
    np.save(tmp_path / "in.npy", np.random.default_rng().standard_normal((1, 1, 16, 16)).astype(np.float32))
    (tmp_path / "labels.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    os.symlink(LENET[2], tmp_path / "weights.link")
    before = {p: p.read_bytes() for p in (tmp_path / "in.npy", tmp_path / "labels.txt", Path(LENET[0]))}
    for target, what in ((tmp_path / "in.npy", "an input file"), (Path(LENET[0]), "the prototxt"),
                         (tmp_path / "weights.link", "the weights file"), (tmp_path / "labels.txt", "the labels")):
        assert main(["run", *LENET, "--input", f"data={tmp_path / 'in.npy'}", "--labels", str(tmp_path / "labels.txt"),
                     "-o", str(target)]) == 2
        assert f"is {what}" in _one_error_line(capsys)
    assert main(["partition", LENET[0], "-o", LENET[0]]) == 2
    assert "is the prototxt this command reads" in _one_error_line(capsys)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (tmp_path / "weights.link").is_symlink()


@pytest.mark.skipif(not IS_ROOT, reason="giving files to another owner needs root")
def test_a_replaced_output_keeps_its_owner_group_and_mode(tmp_path, caplog):
    path = tmp_path / "out.npz"
    path.write_bytes(b"old")
    os.chown(path, 65534, 65534)
    path.chmod(0o640)
    other = tmp_path / "other_name.npz"
    os.link(path, other)
    write_atomically(path, b"new", option="-o")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    assert path.read_bytes() == b"new" and other.read_bytes() == b"old"  # a new file under this name
    assert "has 2 hard links" in caplog.text


def test_relative_outputs_are_fixed_when_parsed(tmp_path, monkeypatch, make_prototxt):
    """A Python layer that changes the current folder cannot move where -o writes."""
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "chdir_layer.py").write_text(
        "import os, caffe\n"
        "class Chdir(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top):\n"
        f"        os.chdir({str(tmp_path / 'elsewhere')!r})\n"
        "        top[0].data[...] = bottom[0].data\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "layers"))
    path = make_prototxt('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
                         'layer { name: "py" type: "Python" bottom: "data" top: "py" '
                         'python_param { module: "chdir_layer" layer: "Chdir" } }\n')
    monkeypatch.chdir(tmp_path / "here")
    assert main(["run", str(path), "--random-weights", "0", "-o", "out.npz"]) == 0
    assert (tmp_path / "here" / "out.npz").is_file() and not (tmp_path / "elsewhere" / "out.npz").exists()


def test_output_paths_in_a_removed_folder_are_refused_early(tmp_path, monkeypatch, capsys):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(SystemExit):
        main(["run", *LENET, "-o", "out.npz"])
    assert "the current folder, which no longer exists" in _one_error_line(capsys)


def test_export_creates_only_its_own_folder(tmp_path, capsys):
    assert main(["export", *LENET, "-o", str(tmp_path / "a" / "b")]) == 2
    assert f"folder {tmp_path / 'a'} does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    assert main(["export", *LENET, "-o", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "manifest.json").is_file()


def test_labels_must_name_every_class(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n")
    assert main(["run", *LENET, "--labels", str(labels)]) == 2
    assert "holds 2 class names, but 'prob' has 10 classes" in _one_error_line(capsys)
    labels.write_text("".join(f"digit {d}\n" for d in range(10)))  # a final newline is no eleventh class
    assert main(["run", *LENET, "--labels", str(labels), "--top", "1"]) == 0
    assert "digit " in capsys.readouterr().out


def test_sixteen_bit_images_keep_their_high_byte_as_opencv_reads_them(tmp_path):
    """Pillow's own convert() clips 16-bit grey to 255; hybrid_infer takes the high byte, as
    Pillow does for 16-bit colour PNGs and OpenCV's imread for 16-bit files."""
    values = np.random.default_rng().integers(0, 65536, size=(16, 16), dtype=np.uint16)
    from PIL import Image
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "g16.png")
    got = load_input(tmp_path / "g16.png", (1, 1, 16, 16), Preprocessing())
    np.testing.assert_array_equal(got[0, 0], (values >> 8).astype(np.float32))
    rgb16 = tmp_path / "rgb16.png"  # a 16-bit colour PNG, written by hand: Pillow reads its high bytes
    rgb = np.random.default_rng().integers(0, 65536, size=(16, 16, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rgb16.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    colour = load_input(rgb16, (1, 3, 16, 16), Preprocessing(channel_order="rgb"))
    np.testing.assert_array_equal(colour[0], (rgb >> 8).transpose(2, 0, 1).astype(np.float32))


def test_floating_point_images_are_refused_naming_the_mode(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((16, 16), 1000.0, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(InputError, match=r"float\.tiff: is a floating-point image \(Pillow mode F\)"):
        load_input(tmp_path / "float.tiff", (1, 1, 16, 16), Preprocessing())


def test_npy_header_with_negative_dimensions_is_refused(tmp_path):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 128), }"
    header += " " * (63 - len(header)) + "\n"
    (tmp_path / "neg.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
                                       + np.zeros(256, np.float32).tobytes())
    with pytest.raises(InputError, match=r"neg\.npy: its header gives the shape \(-2, 128\), with a negative "
                                         r"dimension"):
        load_input(tmp_path / "neg.npy", (1, 128), Preprocessing())
