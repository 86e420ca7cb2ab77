"""Turning the user's files into input tensors: ``.npy`` arrays or images.

Every file is untrusted: it must be a regular file (``files.open_regular_file``), and its
contents are checked before they are believed (``load_npy``, ``load_image``).

Image preprocessing follows Caffe's conventions and is spelled out by flags, never
guessed: pixels in 0..255, channel order BGR unless told otherwise, then
``(pixel - mean[c]) * scale``, laid out as N x C x H x W.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from numpy.lib import format as npy_format

from .errors import InputError
from .files import open_regular_file, read_regular_file

if TYPE_CHECKING:
    import PIL.Image

#: A labels file larger than this is not a list of class names.
MAX_LABELS_BYTES = 64 * 2**20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocessing:
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    channel_order: str = "bgr"
    resize: tuple[int, int] | None = None  # (height, width); default: the model's input size


def load_image(path: Path, shape: Sequence[int], prep: Preprocessing) -> np.ndarray:
    """Read an image as a 1 x C x H x W float32 array for an input of ``shape`` (N, C, H, W).

    Decoding is Pillow's, on untrusted files: an image above Pillow's decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89 million pixels) is refused, not decoded,
    and so is a resize target above it; anything Pillow cannot decode is an ``InputError``.
    """
    from PIL import Image
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise InputError(f"{path}: images can feed 4-D inputs with 1 or 3 channels; this input is "
                         f"{tuple(shape)}: pass a .npy array instead")
    height, width = prep.resize or (shape[2], shape[3])
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise InputError(f"{path}: the input is {height}x{width} pixels, more than the {limit} Pillow decodes "
                         "safely; pass a .npy array, or a smaller --input-shape or --resize")
    with open_regular_file(path, "input file", InputError) as f:
        try:
            with warnings.catch_warnings():
                # Pillow only warns between its limit and twice it; here that is an error too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as img:
                    img = _eight_bit(img, path).convert("L" if shape[1] == 1 else "RGB")
                    if img.size != (width, height):
                        img = img.resize((width, height), Image.BILINEAR)
                    pixels = np.asarray(img, dtype=np.float64)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{path}: refused as a possible decompression bomb ({exc})") from None
        except InputError:
            raise
        except Exception as exc:  # Pillow reports damaged files with many exception types
            raise InputError(f"{path}: cannot read this image ({type(exc).__name__}: {exc})") from None
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if shape[1] == 3 and prep.channel_order == "bgr":
        chw = chw[::-1]
    if prep.mean:
        mean = np.asarray(prep.mean, dtype=np.float64)
        if mean.size not in (1, chw.shape[0]):
            raise InputError(f"--mean has {mean.size} values; the input has {chw.shape[0]} channels")
        chw = chw - mean.reshape(-1, 1, 1)
    # In float64 so that e.g. --scale 0.00392156862745098 gives exactly uint8 / 255.
    return np.ascontiguousarray(chw * prep.scale, dtype=np.float32)[None]


def _eight_bit(img: "PIL.Image.Image", path: Path) -> "PIL.Image.Image":
    """``img`` with 8-bit channels. 16-bit images keep their high byte (``v >> 8``): what
    Pillow itself does to 16-bit colour PNGs, and what OpenCV's ``imread`` (and so Caffe's
    ImageData layer) gives for 16-bit PNGs; Pillow's own ``convert`` would clip every value
    above 255 to 255 instead. 32-bit integer and floating-point images have no one mapping
    to 0..255 and are refused."""
    from PIL import Image
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise InputError(f"{path}: is a {kind} image (Pillow mode {img.mode}); images are read as 8-bit pixels "
                         "(0..255), and its values have no one mapping to those: pass them as a .npy array, "
                         "scaled as the model expects")
    return img


def load_npy(path: Path) -> np.ndarray:
    """Read a ``.npy`` file of floating-point values, checking its header before its data.

    The header is read first (``numpy.lib.format``) and must describe a non-empty array
    of floats with at least one axis whose data the file really holds, so a damaged or
    hostile header never makes numpy allocate what the file does not contain. A ``.npz``
    archive renamed to ``.npy`` is named as such.
    """
    with open_regular_file(path, "input file", InputError) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            version = npy_format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, OSError) as exc:
            f.seek(0)
            if f.read(4) == b"PK\x03\x04":
                raise InputError(f"{path}: is a .npz archive (zip), not a .npy array; save one array with "
                                 "numpy.save, or extract it from the archive") from None
            raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        if dtype.kind != "f":
            raise InputError(f"{path}: holds {dtype} values; Caffe nets take floating point (FP32) inputs: "
                             "convert and scale it first")
        if not shape:
            raise InputError(f"{path}: holds a single number (a 0-d array); inputs are arrays shaped like the "
                             "model's input, with or without the batch axis")
        if any(d < 0 for d in shape):
            raise InputError(f"{path}: its header gives the shape {shape}, with a negative dimension: the file is "
                             "damaged")
        count = math.prod(shape)
        if count == 0:
            raise InputError(f"{path}: holds no values (shape {shape}); an empty batch cannot be run")
        data_bytes = size - f.tell()
        if count * dtype.itemsize > data_bytes:
            raise InputError(f"{path}: its header announces shape {shape} ({count * dtype.itemsize} bytes) but the "
                             f"file holds {data_bytes} bytes of data: it is truncated or damaged")
        try:
            flat = np.fromfile(f, dtype=dtype, count=count)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read its data ({exc})") from None
    check_float32_range(flat, str(path))
    return flat.reshape(shape, order="F" if fortran_order else "C")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(array: np.ndarray, what: str) -> None:
    """Raise InputError if ``array`` holds finite values beyond float32's range (about
    3.4e38): Caffe computes in float32, where they would become Inf. ``what`` names the
    array in the message (a file, an input)."""
    if array.dtype.itemsize <= 4 or not array.size:
        return
    finite = array[np.isfinite(array)]
    if finite.size and np.abs(finite).max() > FLOAT32_MAX:
        value = finite[np.argmax(np.abs(finite))]
        raise InputError(f"{what}: holds {value:g}, beyond the float32 range (±{FLOAT32_MAX:.4g}) Caffe computes "
                         "in; scale the values first")


def load_input(path: Path, shape: Sequence[int], prep: Preprocessing) -> np.ndarray:
    """Read one input from a ``.npy`` file or an image; a missing batch axis is added."""
    if path.suffix.lower() == ".npy":
        array = load_npy(path)
        return array[None] if array.ndim == len(shape) - 1 else array
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image(path, shape, prep)
    raise InputError(f"{path}: unknown input format; use a .npy array or an image "
                     f"({', '.join(sorted(IMAGE_SUFFIXES))})")


def read_labels(path: Path) -> list[str]:
    """Class names for ``--labels``: one per line, UTF-8 (a byte-order mark is allowed)."""
    data = read_regular_file(path, "--labels", InputError, max_bytes=MAX_LABELS_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"--labels {path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                         "save it as UTF-8") from None
    lines = text.split("\n")
    if lines[-1].strip() == "":  # the newline that ends the last line
        lines.pop()
    return [line.strip() for line in lines]


def random_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_indices(shape: Sequence[int], bound: int, seed: int = 0) -> np.ndarray:
    """Random whole numbers in [0, bound) as float32, for inputs that layers read as indices."""
    return np.random.default_rng(seed).integers(0, bound, size=shape).astype(np.float32)
