"""What a calibration really did to a built hybrid, segment by segment, for ``run`` and
``calibrate``: which segments run reduced (a segment in Caffe, or every segment with
``--engine caffe``, stays FP32 whatever the file says), which layers the plan kept in FP32
and why, and on the CPU how many INT8 layers ONNX Runtime actually runs in integer kernels
(inspected in its optimized graph: its QDQ fusion may leave a quantized layer in a float
kernel, ConvTranspose always)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..partition.partitioner import TENSORRT
from .plan import WEIGHTED_TYPES

if TYPE_CHECKING:
    from ..api import HybridNet


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def applied_lines(net: "HybridNet", *, integer_kernels: bool = False) -> list[str]:
    """One line per segment of ``net`` (engines built) saying its precision; empty without a
    calibration. ``integer_kernels``: also inspect ONNX Runtime's optimized INT8 graphs (a
    throw-away session per segment)."""
    plan = net.precision
    if plan is None:
        return []
    lines = []
    for se in net.segment_engines:
        segment = se.segment
        record = plan.applied.get(segment.id)
        if segment.backend != TENSORRT or se.fallback_note or record is None or record.engine != se.engine.kind:
            why = "runs in Caffe" if segment.backend != TENSORRT or se.engine.kind == "caffe" else "fell back to Caffe"
            lines.append(f"  segment {segment.id}: FP32 ({why})")
            continue
        text = f"  segment {segment.id}: {record.label} on {record.engine}, {len(record.reduced)} layer(s) reduced"
        if record.kept:
            text += f"; kept in FP32: {_names(record.kept)}"
        if record.also_fp32:
            reasons: dict[str, list[str]] = {}
            for name, why in record.also_fp32.items():
                reasons.setdefault(why, []).append(name)
            text += "; also FP32: " + "; ".join(f"{_names(names)} ({why})" for why, names in reasons.items())
        if integer_kernels and plan.calibration.precision == "int8" and record.engine == "onnxruntime":
            kernels, floating = record.integer_kernels()
            count = sum(kernels.values())
            weighted = [n for n in record.reduced if plan.graph.layers[n].type in WEIGHTED_TYPES]
            text += (f"; ONNX Runtime runs {count} of its {len(weighted)} INT8 convolution/InnerProduct layers in "
                     "integer kernels"
                     + (f" ({', '.join(f'{op} {n}' for op, n in sorted(kernels.items()))})" if count else "")
                     + (f", {len(floating)} in float kernels ({_names(floating)})" if floating else ""))
        lines.append(text)
    if not any(record.engine == se.engine.kind for se in net.segment_engines
               for record in [plan.applied.get(se.segment.id)] if record is not None and not se.fallback_note):
        lines.insert(0, f"  {plan.label} from {plan.calibration.path} applies to no segment here: everything runs "
                        "in FP32")
    return lines
