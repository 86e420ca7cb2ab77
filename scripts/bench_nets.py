"""Networks the benchmark generates at run time: a ResNet-152-sized net, and any net with a
Python layer inserted mid-network. Nothing generated here is stored in the repository."""
from __future__ import annotations

from pathlib import Path

from hybrid_infer.graph.flops import model_flops
from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.model.protofile import write_prototxt

PYTHON_LAYER = 'python_param { module: "hybrid_example_layers" layer: "HardSwish" }'


def _conv_bn(lines: list[str], name: str, bottom: str, outputs: int, kernel: int, stride: int,
             relu: bool) -> str:
    """He et al.'s Caffe blocks: Convolution (no bias), BatchNorm + Scale in place, ReLU in place."""
    lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                 f'convolution_param {{ num_output: {outputs} kernel_size: {kernel} stride: {stride} '
                 f'pad: {kernel // 2} bias_term: false }} }}')
    lines.append(f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}" '
                 'batch_norm_param { use_global_stats: true } }')
    lines.append(f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}" '
                 'scale_param { bias_term: true } }')
    if relu:
        lines.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}')
    return name


def resnet_prototxt(blocks: tuple[int, ...] = (3, 8, 36, 3), name: str = "ResNet-152") -> str:
    """A deploy prototxt of a bottleneck ResNet (default: ResNet-152's 3-8-36-3 stages)."""
    lines = [f'name: "{name}"',
             'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }']
    x = _conv_bn(lines, "conv1", "data", 64, 7, 2, True)
    lines.append('layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
                 'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }')
    x = "pool1"
    for stage, count in enumerate(blocks, start=2):
        width = 64 * 2 ** (stage - 2)
        for block in range(count):
            tag = f"res{stage}_{block}"
            stride = 2 if block == 0 and stage > 2 else 1
            shortcut = x
            if block == 0:
                shortcut = _conv_bn(lines, f"{tag}_branch1", x, 4 * width, 1, stride, False)
            y = _conv_bn(lines, f"{tag}_branch2a", x, width, 1, stride, True)
            y = _conv_bn(lines, f"{tag}_branch2b", y, width, 3, 1, True)
            y = _conv_bn(lines, f"{tag}_branch2c", y, 4 * width, 1, 1, False)
            lines.append(f'layer {{ name: "{tag}" type: "Eltwise" bottom: "{shortcut}" bottom: "{y}" top: "{tag}" }}')
            lines.append(f'layer {{ name: "{tag}_relu" type: "ReLU" bottom: "{tag}" top: "{tag}" }}')
            x = tag
    lines.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{x}" top: "pool5" '
                 'pooling_param { pool: AVE global_pooling: true } }')
    lines.append('layer { name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000" '
                 'inner_product_param { num_output: 1000 } }')
    lines.append('layer { name: "prob" type: "Softmax" bottom: "fc1000" top: "prob" }')
    return "\n".join(lines) + "\n"


def mid_network_cut(graph: LayerGraph) -> str:
    """The value closest to half the net's FLOPs through which *all* data flows (every later
    layer reads only it or what is computed from it), and which no later layer overwrites:
    a Python layer there splits the net into TensorRT | Caffe | TensorRT."""
    flops = model_flops(graph)
    layers = graph.compute_layers()
    total = sum(flops.values())
    done = 0
    best: tuple[float, str] | None = None
    for i, layer in enumerate(layers):
        done += flops[layer.name]
        later = {name.name for name in layers[i + 1:]}
        live = {v for earlier in layers[:i + 1] for v in earlier.tops
                if any(c in later for c in graph.consumers[v])}
        if len(live) != 1:
            continue
        (value,) = live
        if graph.final_value[graph.values[value].blob] != value or value in graph.outputs:
            continue
        distance = abs(done - total / 2)
        if best is None or distance < best[0]:
            best = (distance, value)
    if best is None:
        raise ValueError(f"{graph.model.prototxt}: no single-tensor cut point to put a Python layer at")
    return best[1]


def with_python_layer(prototxt: Path, out: Path) -> tuple[Path, str]:
    """Write ``prototxt`` with a HardSwish Python layer inserted at ``mid_network_cut``; returns the
    new file and the blob the Python layer reads."""
    model = CaffeModel(prototxt)
    graph = LayerGraph(model)
    value = mid_network_cut(graph)
    blob = graph.values[value].blob
    producer = graph.layers[graph.values[value].producer].index
    net = model.net
    new_top = f"{blob}_python"
    for layer in list(net.layer)[producer + 1:]:
        for i, bottom in enumerate(layer.bottom):
            if bottom == blob:
                layer.bottom[i] = new_top
    layers = list(net.layer)
    del net.layer[:]
    for index, layer in enumerate(layers):
        net.layer.add().CopyFrom(layer)
        if index == producer:
            python = net.layer.add(name="mid_python", type="Python", bottom=[blob], top=[new_top])
            python.python_param.module = "hybrid_example_layers"
            python.python_param.layer = "HardSwish"
    write_prototxt(net, out)
    return out, blob
