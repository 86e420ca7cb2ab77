"""Time and memory of reading a caffemodel whose values are stored packed or unpacked.

Caffe writes ``BlobProto.data`` packed (one length-delimited run); other writers may store
each value with its own key (valid protobuf). The reader must handle both in about the
memory of the values. Prints one table row per layout: file size, median read time of
``--runs`` reads, and the peak memory traced while reading (numpy and Python allocations).

    .venv/bin/python scripts/bench_caffemodel_reader.py [--values 2000000] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
# protobuf's own varint encoder: the files are written byte by byte to get layouts Caffe's writer never makes
from google.protobuf.internal.encoder import _VarintBytes

from hybrid_infer.model.caffemodel import read_caffemodel



def _field(number: int, payload: bytes) -> bytes:
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def _caffemodel(values: np.ndarray, packed: bool, double: bool) -> bytes:
    """A NetParameter with one layer "fc" holding one blob of ``values`` (BlobProto: shape 7,
    data 5 as float, double_data 8 as double)."""
    number, wire, dtype = (8, 1, "<f8") if double else (5, 5, "<f4")
    data = values.astype(dtype)
    if packed:
        stored = _field(number, data.tobytes())
    else:
        records = np.empty(len(data), np.dtype([("key", "u1"), ("value", dtype)]))
        records["key"], records["value"] = number << 3 | wire, data
        stored = records.tobytes()
    blob = _field(7, _field(1, _VarintBytes(len(values)))) + stored
    return _field(100, _field(1, b"fc") + _field(7, blob))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=2_000_000, help="floats in the blob (2,000,000)")
    parser.add_argument("--runs", type=int, default=5, help="reads per layout; the median is shown (5)")
    args = parser.parse_args()
    values = np.random.default_rng(0).standard_normal(args.values).astype(np.float32)
    print(f"{args.values:,} values, median of {args.runs} reads\n")
    print(f"{'layout':<18} {'file MiB':>9} {'read s':>8} {'peak MiB':>9} {'peak / values':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for packed in (True, False):
            for double in (False, True):
                path = Path(tmp) / "blob.caffemodel"
                path.write_bytes(_caffemodel(values, packed, double))
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    read_caffemodel(path)
                    times.append(time.perf_counter() - start)
                tracemalloc.start()
                (layer,) = read_caffemodel(path)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert np.array_equal(layer.blobs[0].data, values)
                label = f"{'packed' if packed else 'unpacked'} {'double' if double else 'float'}"
                print(f"{label:<18} {path.stat().st_size / 2**20:9.1f} {statistics.median(times):8.3f} "
                      f"{peak / 2**20:9.1f} {peak / values.nbytes:13.2f}x")


if __name__ == "__main__":
    main()
