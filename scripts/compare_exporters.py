"""Which torch.onnx exporter gives the faster ONNX Runtime graph for the bundled model's
architecture? Exports one randomly initialised model (the weights do not change the
graph's cost) with the legacy exporter (dynamo=False) and with the dynamo exporter, and
times ONNX Runtime (CPU, 2 threads) on batch 32 x 128 tokens and batch 1 x 16.

    python scripts/compare_exporters.py      # needs requirements-train.txt and onnxscript
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import Bert


def export(model: Bert, path: Path, *, dynamo: bool) -> None:
    sample = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in range(3))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if dynamo:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        shapes: dict[str, Any] = {"dynamic_shapes": {name: {0: batch, 1: sequence} for name in names}}
    else:
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        shapes = {"dynamic_axes": {**axes, "logits": {0: "batch"}}}
    torch.onnx.export(
        model,
        sample,
        str(path),
        input_names=names,
        output_names=["logits"],
        opset_version=18 if dynamo else 17,
        dynamo=dynamo,
        **shapes,
    )


def seconds_per_run(path: Path, rows: int, length: int, runs: int = 20) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.full((rows, length), 100, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for _ in range(3):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return (time.perf_counter() - started) / runs


def main() -> None:
    torch.manual_seed(0)
    model = Bert(5104, 12).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, dynamo in (("legacy (dynamo=False, opset 17)", False), ("dynamo (opset 18)", True)):
            path = Path(tmp) / f"{dynamo}.onnx"
            export(model, path, dynamo=dynamo)
            big = seconds_per_run(path, 32, 128) * 1000
            small = seconds_per_run(path, 1, 16) * 1000
            print(f"{name}: batch 32 x 128 tokens {big:.1f} ms, batch 1 x 16 tokens {small:.2f} ms")


if __name__ == "__main__":
    main()
