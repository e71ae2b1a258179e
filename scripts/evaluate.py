"""Evaluate the bundled model: `make evaluate`.

On the held-out test split: accuracy overall, per intent and on multi-turn dialogues, for
model.onnx (fp32) and model.int8.onnx, a confusion-matrix PNG, and sequences/s at batch 1
and 32 through ONNX Runtime on the test utterances. On real users' utterances
(`../shared/data/real-utterances-dev.jsonl`, evaluation only, never in this repository;
skipped with one line when absent): accuracy, macro-F1 and per-intent recall over the
intents it has, and what each intent is mistaken for. Rewrites the evaluation section of
the model card and writes evaluation.json beside it. Uses the server's own text and
tokenization code.

With `--baseline-commit REV` it also times the bundle as it was at that commit (taken
from git) against this one, alternating, on the same test dialogues: whether a new model
kept the old one's speed.

    python scripts/evaluate.py [--model models/intent-zh] [--data data/intents] [--real PATH]
                               [--baseline-commit REV]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from intents_split import MAX_SEQ_LEN, REAL_DEV, load_split  # noqa: E402

from batcher.config import ModelSettings  # noqa: E402
from batcher.model.bundle import ModelBundle, load_bundle  # noqa: E402
from batcher.model.formats import TextEncoder  # noqa: E402
from batcher.model.session import OnnxModel  # noqa: E402
from batcher.model.tokenization import Encoded  # noqa: E402
from batcher.worker import pad_batch  # noqa: E402

START, END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"


def probabilities(model: OnnxModel, rows: list[Encoded], pad_id: int, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(rows), batch_size):
        logits = model.run(*pad_batch(rows[start : start + batch_size], pad_id))
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        out.append(shifted / shifted.sum(1, keepdims=True))
    return np.concatenate(out)


def predict(model: OnnxModel, rows: list[Encoded], pad_id: int, batch_size: int) -> np.ndarray:
    return probabilities(model, rows, pad_id, batch_size).argmax(1)


THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def threshold_table(probs: np.ndarray, gold: np.ndarray) -> list[dict[str, float]]:
    """For each confidence threshold: the share of answers at or above it, and their accuracy
    (what a client that treats lower confidence as "not sure" keeps)."""
    confidence, correct = probs.max(1), probs.argmax(1) == gold
    rows = []
    for threshold in THRESHOLDS:
        kept = confidence >= threshold
        rows.append(
            {
                "threshold": threshold,
                "kept": float(kept.mean()),
                "accuracy_kept": float(correct[kept].mean()) if kept.any() else float("nan"),
            }
        )
    return rows


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


def speed_against(bundle: ModelBundle, commit: str, data: Path, rounds: int = 5) -> dict[str, Any]:
    """Sequences/s of this bundle and of the bundle at `commit`, same graphs and test
    dialogues (each tokenized by its own bundle), steps alternating; medians of `rounds`."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(
            ["git", "archive", commit, "models/intent-zh"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
        old = Path(scratch) / "models" / "intent-zh"
        settings = ModelSettings(intra_op_threads=2, device="cpu")
        results: dict[str, Any] = {"commit": commit, "rounds": rounds}
        for filename in ("model.onnx", "model.int8.onnx"):
            sides = {}
            for name, directory in (("this", bundle.directory), ("baseline", old)):
                encoder = TextEncoder.from_bundle(directory, MAX_SEQ_LEN)
                rows, _, _ = load_split(data / "test.jsonl", encoder, load_bundle(directory).labels)
                sides[name] = (OnnxModel(load_bundle(directory, filename), settings), rows, encoder.pad_id)
            for batch_size in (1, 32):
                measured: dict[str, list[float]] = {"this": [], "baseline": []}
                for _ in range(rounds):
                    for name, (model, rows, pad_id) in sides.items():
                        measured[name].append(throughput(model, rows, pad_id, batch_size, seconds=2.0))
                this, base = (statistics.median(measured[n]) for n in ("this", "baseline"))
                results[f"{filename} batch {batch_size}"] = {"this": this, "baseline": base, "ratio": this / base}
    return results


def real_scores(gold: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the intents the set has, per-intent recall and the commonest
    mistakes (intent -> what it was read as, with counts)."""
    present = sorted(set(gold.tolist()))
    f1s, recall, mistakes = [], {}, {}
    for i in present:
        true_positive = int(((predicted == i) & (gold == i)).sum())
        precision = true_positive / max(1, int((predicted == i).sum()))
        rec = true_positive / int((gold == i).sum())
        f1s.append(2 * precision * rec / (precision + rec) if precision + rec else 0.0)
        recall[labels[i]] = {"recall": rec, "n": int((gold == i).sum())}
        wrong = predicted[(gold == i) & (predicted != i)]
        counts = {labels[j]: int((wrong == j).sum()) for j in sorted(set(wrong.tolist()))}
        mistakes[labels[i]] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:3])
    return {
        "examples": len(gold),
        "accuracy": float((predicted == gold).mean()),
        "macro_f1": float(np.mean(f1s)),
        "per_intent": recall,
        "mistaken_for": mistakes,
    }


def evaluate_real(bundle: ModelBundle, path: Path) -> dict[str, Any] | None:
    """Both graphs on the real-utterance set, or None when it is absent."""
    if not path.is_file():
        return None
    encoder = TextEncoder.from_bundle(bundle.directory, MAX_SEQ_LEN)
    rows, gold, _ = load_split(path, encoder, bundle.labels)
    settings = ModelSettings(intra_op_threads=2, device="cpu")
    results: dict[str, Any] = {}
    for variant, filename in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        model = OnnxModel(load_bundle(bundle.directory, filename), settings)
        probs = probabilities(model, rows, encoder.pad_id, 32)
        results[variant] = real_scores(gold, probs.argmax(1), bundle.labels)
        results[variant]["thresholds"] = threshold_table(probs, gold)
    return results


def real_markdown(real: dict[str, Any]) -> list[str]:
    fp32, int8 = real["fp32"], real["int8"]
    lines = [
        "",
        f"Real users' utterances (`../shared/data/real-utterances-dev.jsonl`: {fp32['examples']} single-turn "
        "utterances from public Chinese assistant datasets, 9 of the 12 intents; evaluation only, not in this "
        "repository, never trained on):",
        "",
        "| | fp32 | int8 |",
        "|---|---|---|",
        f"| accuracy | {fp32['accuracy']:.4f} | {int8['accuracy']:.4f} |",
        f"| macro-F1 | {fp32['macro_f1']:.4f} | {int8['macro_f1']:.4f} |",
        "",
        "| intent | n | recall fp32 | recall int8 | fp32 mistakes it most for |",
        "|---|---|---|---|---|",
    ]
    for name, row in fp32["per_intent"].items():
        mistakes = ", ".join(f"{other} {count}" for other, count in fp32["mistaken_for"][name].items()) or "-"
        lines.append(
            f"| {name} | {row['n']} | {row['recall']:.3f} | {int8['per_intent'][name]['recall']:.3f} | {mistakes} |"
        )
    lines += [
        "",
        'A confidence threshold for "not sure" (fp32, these utterances): answers at or above it, and how many '
        "of those are right.",
        "",
        "| confidence ≥ | answers kept | accuracy of those |",
        "|---|---|---|",
        *(
            f"| {row['threshold']:.2f} | {row['kept']:.1%} | {row['accuracy_kept']:.1%} |"
            for row in fp32.get("thresholds", [])
        ),
    ]
    return lines


def training_markdown(training: dict[str, Any]) -> list[str]:
    """The teacher's own figures and the calibration, from training.json (make train)."""
    teacher, calibration = training.get("teacher", {}), training.get("calibration", {})
    lines = [
        "",
        "From `make train` (`training.json`): the teacher (multilingual-e5-small, fine-tuned) scored "
        f"{teacher.get('dev_accuracy', float('nan')):.4f} on dev and {teacher.get('test_accuracy', float('nan')):.4f} "
        "on test",
    ]
    if "real_dev_accuracy" in teacher:
        per_intent = ", ".join(f"{k} {v:.3f}" for k, v in teacher["real_dev_per_intent"].items())
        lines[-1] += f", {teacher['real_dev_accuracy']:.4f} on the real utterances ({per_intent})"
    lines[-1] += "."
    if calibration:
        rows = [
            f"| {name.replace('_', ' ')} | {before:.4f} | {calibration[f'ece_{name}_after']:.4f} |"
            for name in ("dev", "test", "real_dev")
            if (before := calibration.get(f"ece_{name}_before")) is not None
        ]
        lines += [
            "",
            f"Calibration: temperature {calibration['temperature']:.3f} (fitted on dev, folded into the classifier). "
            "Expected calibration error (10 bins) of the confidence:",
            "",
            "| set | before | after |",
            "|---|---|---|",
            *rows,
        ]
    return lines


def evaluate(bundle: ModelBundle, data: Path) -> dict[str, Any]:
    encoder = TextEncoder.from_bundle(bundle.directory, MAX_SEQ_LEN)
    rows, gold, multi = load_split(data / "test.jsonl", encoder, bundle.labels)
    settings = ModelSettings(intra_op_threads=2, device="cpu")
    results: dict[str, Any] = {"examples": len(rows), "multi_turn_examples": int(multi.sum())}
    for variant, filename in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        model = OnnxModel(load_bundle(bundle.directory, filename), settings)
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
    if results.get("real_dev"):
        lines += real_markdown(results["real_dev"])
    training = results.get("training")
    if training:
        lines += training_markdown(training)
    if results.get("speed_against"):
        speed = results["speed_against"]
        lines += [
            "",
            f"Speed against the bundle at commit `{speed['commit']}` (the previous model), same test dialogues, "
            f"steps alternating, median of {speed['rounds']} × 2 s each, ONNX Runtime CPU, 2 threads:",
            "",
            "| graph, batch | sequences/s, this model | previous model | ratio |",
            "|---|---|---|---|",
        ]
        for key, row in speed.items():
            if isinstance(row, dict):
                lines.append(f"| {key} | {row['this']:.0f} | {row['baseline']:.0f} | {row['ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "intent-zh", help="bundle directory")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "intents", help="dataset directory")
    parser.add_argument("--real", type=Path, default=REAL_DEV, help="real-utterance JSONL (default: %(default)s)")
    parser.add_argument("--baseline-commit", help="also time the bundle at this git commit against this one")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    print("evaluating on the test split (accuracy, then ~12 s of speed measurements)…", flush=True)
    results = evaluate(bundle, args.data)
    results["real_dev"] = evaluate_real(bundle, args.real)
    training = args.model / "training.json"
    if training.is_file():
        results["training"] = json.loads(training.read_text(encoding="utf-8"))
    if results["real_dev"] is None:
        print(f"real-utterance evaluation skipped: {args.real} is absent (it is never in this repository)")
    if args.baseline_commit:
        print(f"timing against the bundle at {args.baseline_commit} (~1 min)…", flush=True)
        results["speed_against"] = speed_against(bundle, args.baseline_commit, args.data)
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
