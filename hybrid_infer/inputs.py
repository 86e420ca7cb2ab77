"""Turning the user's files into input tensors: ``.npy`` arrays or images.

Image preprocessing follows Caffe's conventions and is spelled out by flags, never
guessed: pixels in 0..255, channel order BGR unless told otherwise, then
``(pixel - mean[c]) * scale``, laid out as N x C x H x W.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Preprocessing:
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    channel_order: str = "bgr"
    resize: tuple[int, int] | None = None  # (height, width); default: the model's input size


def load_image(path: Path, shape: Sequence[int], prep: Preprocessing) -> np.ndarray:
    """Read an image as a 1 x C x H x W float32 array for an input of ``shape`` (N, C, H, W)."""
    from PIL import Image, UnidentifiedImageError
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise InputError(f"{path}: images can feed 4-D inputs with 1 or 3 channels; this input is "
                         f"{tuple(shape)}: pass a .npy array instead")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if shape[1] == 1 else "RGB")
            height, width = prep.resize or (shape[2], shape[3])
            if img.size != (width, height):
                img = img.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float64)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read this image ({exc})") from None
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


def load_input(path: Path, shape: Sequence[int], prep: Preprocessing) -> np.ndarray:
    """Read one input from a ``.npy`` file or an image; a missing batch axis is added."""
    if not path.is_file():
        raise InputError(f"input file '{path}' does not exist")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        return array[None] if array.ndim == len(shape) - 1 else array
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image(path, shape, prep)
    raise InputError(f"{path}: unknown input format; use a .npy array or an image "
                     f"({', '.join(sorted(IMAGE_SUFFIXES))})")


def random_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_indices(shape: Sequence[int], bound: int, seed: int = 0) -> np.ndarray:
    """Random whole numbers in [0, bound) as float32, for inputs that layers read as indices."""
    return np.random.default_rng(seed).integers(0, bound, size=shape).astype(np.float32)
