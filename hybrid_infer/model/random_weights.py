"""Random but well-conditioned parameters, for models shipped without weights.

Tests and benchmarks compare hybrid_infer against Caffe on models whose trained
weights are not available. Plain N(0, 1) weights make deep nets overflow and
BatchNorm variances negative, so each layer type gets a distribution that keeps
activations in a sensible range and every value non-zero.
"""
from __future__ import annotations

import numpy as np

Shape = tuple[int, ...]


def _fan_in_normal(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    fan_in = max(1, int(np.prod(shape[1:])))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def _layer_params(rng: np.random.Generator, layer_type: str, shapes: list[Shape]) -> list[np.ndarray]:
    if layer_type in ("BatchNorm", "BatchNormKyle"):
        mean, var, factor = shapes[:3]
        statistics = [rng.normal(0.0, 0.2, mean), rng.uniform(0.5, 1.5, var), rng.uniform(0.5, 2.0, factor)]
        # BatchNormKyle's optional alpha (scale) and beta (shift)
        return statistics + [rng.uniform(0.5, 1.5, s) if i == 0 else rng.normal(0.0, 0.2, s)
                             for i, s in enumerate(shapes[3:])]
    arrays = []
    for i, shape in enumerate(shapes):
        if layer_type in ("Convolution", "Deconvolution", "InnerProduct") and i == 0:
            arrays.append(_fan_in_normal(rng, shape))
        elif layer_type in ("Scale", "Normalize") and i == 0:
            arrays.append(rng.uniform(0.5, 1.5, shape))
        elif layer_type == "PReLU":
            arrays.append(rng.uniform(0.05, 0.4, shape))
        else:
            arrays.append(rng.normal(0.0, 0.1, shape))
    return arrays


def random_weights(param_shapes: dict[str, list[Shape]], layer_types: dict[str, str],
                   seed: int) -> dict[str, list[np.ndarray]]:
    """Draw parameters for every layer in ``param_shapes`` (layer name -> blob shapes)."""
    rng = np.random.default_rng(seed)
    return {name: [a.astype(np.float32) for a in _layer_params(rng, layer_types[name], shapes)]
            for name, shapes in param_shapes.items()}
