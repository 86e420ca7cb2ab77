"""``hybrid-infer export``: write each TensorRT segment as a checked ONNX file plus a manifest,
for trtexec, Polygraphy or Netron."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from ..executor.engine_factory import segment_onnx
from ..partition.partitioner import TENSORRT
from ..report.partition_report import to_json
from ..errors import OptionError
from ..files import check_not_read, check_output_folder, write_files_atomically
from .common import add_model_options, open_net
from .input_options import files_read
from .option_types import output_folder
from .precision_options import add_precision_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write TensorRT segments as ONNX files with a manifest",
                       description="Write each TensorRT segment's ONNX (with --calibration: the Q/DQ or FP16 ONNX "
                                   "TensorRT builds from it) and manifest.json, for trtexec, Polygraphy or Netron.")
    add_model_options(p)
    p.add_argument("-o", "--output-dir", type=output_folder, required=True, help="folder for the .onnx files")
    add_precision_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder: Path = args.output_dir
    check_output_folder(folder, "-o", may_create=True)
    if not folder.exists():  # only the export folder itself is created, never its parents
        check_output_folder(folder.parent, "-o", folder)
    net = open_net(args)
    manifest = to_json(net.partition)
    files: dict[Path, bytes] = {}
    lines = []
    for entry, segment in zip(manifest["segments"], net.partition.segments):
        if segment.backend != TENSORRT:
            continue
        model = segment_onnx(net.graph, net.model, segment)
        if net.precision is not None:  # what TensorRT builds: the Q/DQ (or FP16) ONNX of its placement
            model = net.precision.segment_model(model, segment, "tensorrt")
            entry["precision"] = net.precision.label
        onnx.checker.check_model(model, full_check=True)
        name = f"segment{segment.id}.onnx"
        data = model.SerializeToString()
        files[folder / name] = data
        entry["onnx"] = name
        entry["onnx_bytes"] = len(data)
        lines.append(f"segment {segment.id}: {len(segment.layers)} layers -> {folder / name} "
                     f"({len(data) / 2**20:.1f} MiB{', ' + net.precision.label + ' for TensorRT' if net.precision else ''})")
    # All segments and the manifest land together (manifest last), or none of them does.
    files[folder / "manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    for path in files:
        check_not_read(path, "-o", files_read(args))
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OptionError(f"-o {folder}: cannot create this folder ({exc.strerror or exc})") from None
    write_files_atomically(files, option="-o")
    print("\n".join(lines))
    print(f"wrote {folder / 'manifest.json'}")
    return 0
