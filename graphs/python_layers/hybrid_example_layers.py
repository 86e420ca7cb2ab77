"""Example Caffe Python layers used by hybrid_infer's bundled graphs.

Put this folder on PYTHONPATH and refer to a layer from a prototxt as::

    layer {
      name: "act" type: "Python" bottom: "x" top: "y"
      python_param { module: "hybrid_example_layers" layer: "HardSwish"
                     param_str: '{"shift": 3.0, "divisor": 6.0}' }
    }

Every layer takes one bottom and gives one top of the same shape, reads its
options from ``param_str`` as a JSON object (empty means all defaults; unknown
keys are an error, so a typo fails loudly) and implements ``backward`` too.
None has learnable parameters. Part of hybrid_infer; BSD-2-Clause.
"""
from __future__ import annotations

import json

import numpy as np

import caffe


class _JsonParamLayer(caffe.Layer):
    """Common plumbing: one bottom, one top of the same shape, JSON options."""

    DEFAULTS: dict = {}

    def _options(self) -> dict:
        text = (getattr(self, "param_str", "") or "").strip()
        try:
            given = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{type(self).__name__}: param_str is not JSON ({exc}): {text!r}") from None
        if not isinstance(given, dict):
            raise ValueError(f"{type(self).__name__}: param_str must be a JSON object, got {text!r}")
        unknown = sorted(set(given) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown param_str keys {unknown}; "
                             f"known: {sorted(self.DEFAULTS)}")
        return {**self.DEFAULTS, **given}

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one bottom and one top")
        self.configure(self._options(), bottom[0].data.shape)

    def configure(self, options: dict, shape: tuple) -> None:
        raise NotImplementedError

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)


class HardSwish(_JsonParamLayer):
    """y = x * clip(x + shift, 0, divisor) / divisor   (MobileNetV3's h-swish with the defaults)."""

    DEFAULTS = {"shift": 3.0, "divisor": 6.0}

    def configure(self, options, shape):
        self.shift = float(options["shift"])
        self.divisor = float(options["divisor"])
        if self.divisor <= 0:
            raise ValueError("HardSwish: divisor must be > 0")

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = x * np.clip(x + self.shift, 0.0, self.divisor) / self.divisor

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data
        gate = np.clip(x + self.shift, 0.0, self.divisor) / self.divisor
        inside = ((x + self.shift) > 0) & ((x + self.shift) < self.divisor)
        bottom[0].diff[...] = top[0].diff * (gate + inside * x / self.divisor)


class Swish(_JsonParamLayer):
    """y = x * sigmoid(beta * x)."""

    DEFAULTS = {"beta": 1.0}

    def configure(self, options, shape):
        self.beta = float(options["beta"])

    def _sigmoid(self, x):
        return 0.5 * (1.0 + np.tanh(0.5 * self.beta * x))  # overflow-free logistic

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = x * self._sigmoid(x)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data
        s = self._sigmoid(x)
        bottom[0].diff[...] = top[0].diff * (s + self.beta * x * s * (1.0 - s))


class SoftClip(_JsonParamLayer):
    """Channel-wise soft clipping: y = limit_c * tanh(x / limit_c), channels on axis 1.

    ``limit`` is one number for all channels or a list with one entry per channel.
    """

    DEFAULTS = {"limit": 4.0}

    def configure(self, options, shape):
        limit = np.asarray(options["limit"], dtype=np.float32).reshape(-1)
        if np.any(limit <= 0):
            raise ValueError("SoftClip: every limit must be > 0")
        if limit.size != 1:
            if len(shape) < 2 or limit.size != shape[1]:
                raise ValueError(f"SoftClip: {limit.size} limits for a blob of shape {tuple(shape)}; "
                                 "give one, or one per channel (axis 1)")
            limit = limit.reshape((1, -1) + (1,) * (len(shape) - 2))
        self.limit = limit

    def forward(self, bottom, top):
        top[0].data[...] = self.limit * np.tanh(bottom[0].data / self.limit)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        t = np.tanh(bottom[0].data / self.limit)
        bottom[0].diff[...] = top[0].diff * (1.0 - t * t)


class Temperature(_JsonParamLayer):
    """Re-temper probabilities along axis 1: y = p^(1/T) / sum_c p^(1/T).

    Applied to a softmax output this equals softmax(logits / T); T > 1 flattens,
    T < 1 sharpens.
    """

    DEFAULTS = {"temperature": 1.0}

    def configure(self, options, shape):
        self.temperature = float(options["temperature"])
        if self.temperature <= 0:
            raise ValueError("Temperature: temperature must be > 0")
        if len(shape) < 2:
            raise ValueError("Temperature: the bottom needs a channel axis (axis 1)")

    def forward(self, bottom, top):
        z = np.log(np.maximum(bottom[0].data, 1e-30)) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        top[0].data[...] = e / e.sum(axis=1, keepdims=True)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, g = top[0].data, top[0].diff
        dz = y * (g - (g * y).sum(axis=1, keepdims=True))
        bottom[0].diff[...] = dz / (self.temperature * np.maximum(bottom[0].data, 1e-30))
