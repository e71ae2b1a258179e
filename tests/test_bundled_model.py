"""The shipped model (models/intent-zh) against what its card claims: the test split's
accuracy, and the real-utterance figures when that evaluation-only set is here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from batcher.config import ModelSettings
from batcher.model.bundle import load_bundle
from batcher.model.formats import TextEncoder
from batcher.model.session import OnnxModel

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "intent-zh"


def load_script(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EVALUATE = load_script("evaluate")  # scripts/evaluate.py: what make evaluate runs
REAL_DEV: Path = EVALUATE.REAL_DEV


def predictions(path: Path, graph: str) -> tuple[np.ndarray, np.ndarray]:
    """As `make evaluate` computes them: its batches of 32 and session settings. int8's
    dynamic quantization scales activations per batch, so other batches can flip a close call."""
    bundle = load_bundle(BUNDLE, graph)
    encoder = TextEncoder.from_bundle(BUNDLE, EVALUATE.MAX_SEQ_LEN)
    rows, gold, _ = EVALUATE.load_split(path, encoder, bundle.labels)
    model = OnnxModel(bundle, ModelSettings(intra_op_threads=2, device="cpu"))
    predicted: np.ndarray = EVALUATE.predict(model, rows, encoder.pad_id, 32)
    return predicted, gold


@pytest.mark.parametrize("graph", ["model.onnx", "model.int8.onnx"])
def test_the_shipped_model_scores_what_its_card_says_on_the_test_split(graph: str) -> None:
    predicted, gold = predictions(ROOT / "data" / "intents" / "test.jsonl", graph)
    recorded = json.loads((BUNDLE / "evaluation.json").read_text())
    variant = "fp32" if graph == "model.onnx" else "int8"
    assert float((predicted == gold).mean()) == pytest.approx(recorded[variant]["accuracy"], abs=1e-9)
    assert float((predicted == gold).mean()) >= 0.97


def test_multi_turn_accuracy_and_int8_hold_the_bounds_the_card_claims() -> None:
    recorded = json.loads((BUNDLE / "evaluation.json").read_text())
    assert recorded["fp32"]["multi_turn_accuracy"] >= 0.95
    assert abs(recorded["int8"]["accuracy"] - recorded["fp32"]["accuracy"]) <= 0.01


ABSENT = f"{REAL_DEV.name} is absent (evaluation-only data, never in the repo)"


@pytest.mark.skipif(not REAL_DEV.is_file(), reason=ABSENT)
@pytest.mark.parametrize("graph", ["model.onnx", "model.int8.onnx"])
def test_the_real_utterance_figures_in_the_card_are_reproduced(graph: str) -> None:
    predicted, gold = predictions(REAL_DEV, graph)
    recorded = json.loads((BUNDLE / "evaluation.json").read_text())["real_dev"]
    variant = "fp32" if graph == "model.onnx" else "int8"
    assert float((predicted == gold).mean()) == pytest.approx(recorded[variant]["accuracy"], abs=1e-9)
    assert float((predicted == gold).mean()) >= 0.92
    labels = load_bundle(BUNDLE).labels
    for intent in sorted(set(gold.tolist())):
        recall = float((predicted[gold == intent] == intent).mean())
        assert recall >= 0.85, labels[intent]


def test_evaluate_skips_the_real_utterances_cleanly_when_absent(tmp_path: Path) -> None:
    assert EVALUATE.evaluate_real(load_bundle(BUNDLE), tmp_path / "absent.jsonl") is None
