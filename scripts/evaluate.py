"""Evaluate the bundled model on the held-out test split: `make evaluate`.

Accuracy overall, per intent and on multi-turn dialogues, for model.onnx (fp32) and
model.int8.onnx, a confusion-matrix PNG, and sequences/s at batch 1 and 32 through ONNX
Runtime on the test utterances. Rewrites the evaluation section of the model card and
writes evaluation.json beside it. Uses the server's own text and tokenization code.

    python scripts/evaluate.py [--model models/intent-zh] [--data data/intents]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from intents_split import MAX_SEQ_LEN, load_split  # noqa: E402

from batcher.bundle import ModelBundle, load_bundle  # noqa: E402
from batcher.config import ModelSettings  # noqa: E402
from batcher.model import OnnxModel  # noqa: E402
from batcher.tokenization import Encoded, TextEncoder  # noqa: E402
from batcher.worker import pad_batch  # noqa: E402

START, END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"


def predict(model: OnnxModel, rows: list[Encoded], pad_id: int, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(rows), batch_size):
        out.append(model.run(*pad_batch(rows[start : start + batch_size], pad_id)).argmax(1))
    return np.concatenate(out)


def throughput(model: OnnxModel, rows: list[Encoded], pad_id: int, batch_size: int, seconds: float = 3.0) -> float:
    predict(model, rows[:64], pad_id, batch_size)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict(model, rows, pad_id, batch_size)
        done += len(rows)
    return done / (time.perf_counter() - started)


def confusion_png(matrix: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    image = axes.imshow(matrix, cmap="Blues")
    ticks = range(len(matrix))
    axes.set_xticks(ticks, [str(i) for i in ticks])
    axes.set_yticks(ticks, [str(i) for i in ticks])
    axes.set_xlabel("predicted intent id")
    axes.set_ylabel("true intent id")
    axes.set_title("intent-zh, test split (ids as in labels.json)")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            axes.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > matrix.max() / 2 else "black",
            )
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate(bundle: ModelBundle, data: Path) -> dict[str, Any]:
    encoder = TextEncoder.from_bundle(bundle.directory, MAX_SEQ_LEN)
    rows, gold, multi = load_split(data / "test.jsonl", encoder, bundle.labels)
    settings = ModelSettings(intra_op_threads=2, device="cpu")
    results: dict[str, Any] = {"examples": len(rows), "multi_turn_examples": int(multi.sum())}
    for variant, filename in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        model = OnnxModel(ModelBundle(bundle.directory, bundle.directory / filename, bundle.labels, ""), settings)
        predicted = predict(model, rows, encoder.pad_id, 32)
        correct = predicted == gold
        results[variant] = {
            "accuracy": float(correct.mean()),
            "multi_turn_accuracy": float(correct[multi].mean()),
            "single_turn_accuracy": float(correct[~multi].mean()),
            "per_intent": {name: float(correct[gold == i].mean()) for i, name in enumerate(bundle.labels)},
            "sequences_per_s_batch_1": throughput(model, rows, encoder.pad_id, 1),
            "sequences_per_s_batch_32": throughput(model, rows, encoder.pad_id, 32),
            "file_bytes": (bundle.directory / filename).stat().st_size,
        }
        if variant == "fp32":
            matrix = np.zeros((len(bundle.labels),) * 2, dtype=int)
            for g, p in zip(gold, predicted, strict=True):
                matrix[g, p] += 1
            confusion_png(matrix, bundle.directory / "confusion.png")
    return results


def markdown(results: dict[str, Any], labels: list[str]) -> str:
    fp32, int8 = results["fp32"], results["int8"]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Measured by `make evaluate` on {datetime.date.today()} ({os.cpu_count()} CPU cores, {cpu}, no GPU; "
        f"ONNX Runtime CPU, 2 intra-op threads). Test split: {results['examples']} examples, "
        f"{results['multi_turn_examples']} multi-turn.",
        "",
        "| | fp32 `model.onnx` | int8 `model.int8.onnx` |",
        "|---|---|---|",
        f"| accuracy, all | {fp32['accuracy']:.4f} | {int8['accuracy']:.4f} |",
        f"| accuracy, multi-turn | {fp32['multi_turn_accuracy']:.4f} | {int8['multi_turn_accuracy']:.4f} |",
        f"| accuracy, single-turn | {fp32['single_turn_accuracy']:.4f} | {int8['single_turn_accuracy']:.4f} |",
        f"| sequences/s, batch 1 | {fp32['sequences_per_s_batch_1']:.0f} | {int8['sequences_per_s_batch_1']:.0f} |",
        f"| sequences/s, batch 32 | {fp32['sequences_per_s_batch_32']:.0f} | {int8['sequences_per_s_batch_32']:.0f} |",
        f"| file size | {fp32['file_bytes'] / 2**20:.1f} MiB | {int8['file_bytes'] / 2**20:.1f} MiB |",
        "",
        "Per intent (fp32 / int8):",
        "",
        "| id | intent | fp32 | int8 |",
        "|---|---|---|---|",
    ]
    for index, name in enumerate(labels):
        lines.append(f"| {index} | {name} | {fp32['per_intent'][name]:.3f} | {int8['per_intent'][name]:.3f} |")
    lines += ["", "![confusion matrix of the fp32 model on the test split](confusion.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "intent-zh", help="bundle directory")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "intents", help="dataset directory")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    print("evaluating on the test split (accuracy, then ~12 s of speed measurements)…", flush=True)
    results = evaluate(bundle, args.data)
    (args.model / "evaluation.json").write_text(
        json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    table = markdown(results, bundle.labels)
    print(table)
    card = args.model / "README.md"
    if card.is_file() and START in card.read_text(encoding="utf-8"):
        text = card.read_text(encoding="utf-8")
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
        card.write_text(text, encoding="utf-8")
        print(f"updated {card}")


if __name__ == "__main__":
    main()
