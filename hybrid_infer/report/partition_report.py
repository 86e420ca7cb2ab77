"""Partition reports: a readable table, JSON for scripts, and a coloured graph picture."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import EnvironmentProblem
from ..graph.flops import model_flops
from ..lowering.registry import REGISTRY
from ..partition.partitioner import TENSORRT, Partition

COLOURS = {"tensorrt": ("#76b900", "#e8f5d0"), "caffe": ("#d9822b", "#fbe3cc")}


@dataclass(frozen=True)
class Coverage:
    layers_total: int
    layers_tensorrt: int
    flops_total: int
    flops_tensorrt: int

    @property
    def layer_share(self) -> float:
        return self.layers_tensorrt / self.layers_total if self.layers_total else 0.0

    @property
    def flop_share(self) -> float:
        return self.flops_tensorrt / self.flops_total if self.flops_total else 0.0


def coverage(p: Partition) -> Coverage:
    flops = model_flops(p.graph)
    on_trt = [name for s in p.segments if s.backend == TENSORRT for name in s.layers]
    return Coverage(len(flops), len(on_trt), sum(flops.values()), sum(flops[n] for n in on_trt))


def user_lowerings(p: Partition) -> list[dict[str, Any]]:
    """Every lowering in force that is not hybrid_infer's own: where it came from (``--lowerings``,
    ``lowerings=``, an entry point, the module that registered it), whether it replaced a
    built-in one, and which layers of this model it lowers on TensorRT (``layers``) or left to
    Caffe (``refused``: layer -> reason)."""
    rows: dict[str, dict[str, Any]] = {}
    for registration in REGISTRY.registrations():
        if not registration.built_in:
            rows[str(registration.target)] = {
                "target": str(registration.target), "origin": registration.origin,
                "function": f"{registration.lower.__module__}.{registration.lower.__qualname__}",
                "replaces_built_in": REGISTRY.replaced_built_in(registration.target),
                "layers": [], "refused": {}}
    backend = {name: s.backend for s in p.segments for name in s.layers}
    for layer in p.graph.compute_layers():
        registration = REGISTRY.find(layer)
        if registration is None or registration.built_in:
            continue
        row = rows[str(registration.target)]
        if backend[layer.name] == TENSORRT:
            row["layers"].append(layer.name)
        else:
            row["refused"][layer.name] = p.fallback_reasons.get(layer.name, "in Caffe")
    return list(rows.values())


def _lowering_row(r: dict[str, Any]) -> list[str]:
    use = ", ".join(r["layers"]) or "-"
    if r["refused"]:
        use += f"; in Caffe: {', '.join(r['refused'])}"
    if not r["layers"] and not r["refused"]:
        use = "no layer of this model"
    return [r["target"] + (" (replaces the built-in)" if r["replaces_built_in"] else ""), r["function"],
            r["origin"], use]


def _consumers_by_segment(p: Partition) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for s in p.segments:
        for v in s.inputs:
            users.setdefault(v, []).append(s.id)
    return users


def boundaries(p: Partition) -> list[dict[str, Any]]:
    """Every value handed from one segment to another, with its size per image."""
    users = _consumers_by_segment(p)
    rows = []
    for value in p.boundary_values():
        v = p.graph.values[value]
        rows.append({"value": value, "blob": v.blob, "shape": list(v.shape),
                     "bytes_per_image": v.bytes_per_item,
                     "from_segment": p.segment_of(v.producer).id, "to_segments": users[value]})
    return rows


def to_json(p: Partition) -> dict[str, Any]:
    cov = coverage(p)
    flops = model_flops(p.graph)
    tensors = {v: p.graph.values[v] for s in p.segments for v in (*s.inputs, *s.outputs)}
    return {
        "model": str(p.graph.model.prototxt),
        "profile": p.profile,
        "min_segment_size": p.min_segment_size,
        "segments": [{
            "id": s.id, "backend": s.backend, "layers": s.layers, "inputs": s.inputs,
            "outputs": s.outputs, "compute_layers": s.compute_layer_count(p.graph),
            "flops_per_image": sum(flops.get(n, 0) for n in s.layers)} for s in p.segments],
        "tensors": {k: {"blob": v.blob, "shape": list(v.shape), "bytes_per_image": v.bytes_per_item}
                    for k, v in tensors.items()},
        "boundaries": boundaries(p),
        "fallback_reasons": p.fallback_reasons,
        "small_segments": [{"layers": list(d.layers), "compute_layers": d.compute_layers,
                            "moved_to_caffe": d.moved_to_caffe, "reason": d.reason} for d in p.small_segments],
        "dropped_layers": [{"layer": d.name, "type": d.type, "reason": d.reason}
                           for d in p.graph.model.dropped_layers],
        "user_lowerings": user_lowerings(p),
        "coverage": {"layers": cov.layers_total, "layers_tensorrt": cov.layers_tensorrt,
                     "layer_share": round(cov.layer_share, 4), "flops_per_image": cov.flops_total,
                     "flops_tensorrt": cov.flops_tensorrt, "flop_share": round(cov.flop_share, 4)},
    }


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_flops(n: int) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def to_text(p: Partition) -> str:
    cov = coverage(p)
    bounds = boundaries(p)
    out = [f"model    {p.graph.model.prototxt}",
           f"profile  {p.profile}, min segment size {p.min_segment_size}",
           f"coverage {cov.layers_tensorrt}/{cov.layers_total} layers ({cov.layer_share:.1%}) and "
           f"{cov.flop_share:.1%} of {_human_flops(cov.flops_total)} per image on TensorRT; "
           f"{len(p.segments)} segment(s), {len(bounds)} boundary tensor(s), "
           f"{_human_bytes(sum(b['bytes_per_image'] for b in bounds))} per image across boundaries", ""]
    rows = [[str(s.id), s.backend, str(len(s.layers)), str(s.compute_layer_count(p.graph)),
             str(len(s.inputs)), str(len(s.outputs)),
             _span(s.layers)] for s in p.segments]
    out += _table(["seg", "backend", "layers", "compute", "in", "out", "layers (first .. last)"], rows)
    if bounds:
        out += ["", "boundary tensors (per image)"]
        out += _table(["value", "shape", "bytes", "from -> to"],
                      [[b["value"], "x".join(map(str, b["shape"])), _human_bytes(b["bytes_per_image"]),
                        f"{b['from_segment']} -> {','.join(map(str, b['to_segments']))}"] for b in bounds])
    lowerings = user_lowerings(p)
    if lowerings:
        out += ["", "lowerings not built into hybrid_infer"]
        out += _table(["for", "function", "from", "layers on TensorRT"], [_lowering_row(r) for r in lowerings])
    if p.fallback_reasons:
        out += ["", "layers in Caffe and why"]
        out += _table(["layer", "type", "reason"],
                      [[name, p.graph.layers[name].type, why] for name, why in p.fallback_reasons.items()])
    if p.small_segments:
        out += ["", f"TensorRT segments below --min-segment-size {p.min_segment_size}"]
        out += _table(["layers", "compute", "decision"],
                      [[_span(d.layers), str(d.compute_layers), d.reason] for d in p.small_segments])
    if p.graph.model.dropped_layers:
        out += ["", "training-only layers dropped (their inputs cannot be produced at inference)"]
        out += _table(["layer", "type", "reason"],
                      [[d.name, d.type, d.reason] for d in p.graph.model.dropped_layers])
    return "\n".join(out) + "\n"


def _span(layers: Sequence[str]) -> str:
    return f"{layers[0]} .. {layers[-1]}" if len(layers) > 1 else layers[0]


def _dot_id(name: str) -> str:
    return json.dumps(name)


def to_dot(p: Partition) -> str:
    """Graphviz source: layers as nodes, one filled cluster per segment, boundary edges bold."""
    lines = ["digraph partition {", '  rankdir=TB; node [shape=box, style="rounded,filled", '
             'fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", fontsize=8, color="#555555"];']
    for value in p.graph.inputs:
        v = p.graph.values[value]
        label = f"{v.blob}\\n{'x'.join(map(str, v.shape))}"
        lines.append(f"  {_dot_id(v.producer)} [label=\"{label}\", shape=ellipse, fillcolor=\"#dddddd\"];")
    for s in p.segments:
        border, fill = COLOURS[s.backend]
        lines.append(f"  subgraph \"cluster_{s.id}\" {{")
        lines.append(f"    label=\"segment {s.id}: {s.backend}\"; style=\"rounded,filled\"; "
                     f"color=\"{border}\"; fillcolor=\"{fill}\"; fontname=\"Helvetica\";")
        for name in s.layers:
            layer = p.graph.layers[name]
            label = json.dumps(f"{name}\n{layer.type}")[1:-1]
            lines.append(f"    {_dot_id(name)} [label=\"{label}\", fillcolor=\"white\", color=\"{border}\"];")
        lines.append("  }")
    seg_of = {n: s.id for s in p.segments for n in s.layers}
    for u, w, data in p.graph.graph.edges(data=True):
        crossing = seg_of.get(u) != seg_of.get(w)
        attrs = []
        if crossing and u in seg_of:
            shape = "x".join(map(str, p.graph.values[data["values"][0]].shape))
            attrs += ["penwidth=2.2", 'color="#c0392b"', f'label="{shape}"']
        lines.append(f"  {_dot_id(u)} -> {_dot_id(w)}{' [' + ', '.join(attrs) + ']' if attrs else ''};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(p: Partition) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise EnvironmentProblem("SVG output needs Graphviz's 'dot' program: install graphviz "
                                 "(apt-get install graphviz), or use --format dot")
    proc = subprocess.run([dot, "-Tsvg"], input=to_dot(p), capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"Graphviz failed to draw the partition: {proc.stderr.strip()}")
    return proc.stdout


FORMATS = {"text": to_text, "json": lambda p: json.dumps(to_json(p), indent=2) + "\n",
           "dot": to_dot, "svg": to_svg}
