"""Read a data/intents split as the model sees it: the server's own dialogue text and
tokenizer, so training, evaluation and serving agree on every input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batcher.model.formats import TextEncoder
from batcher.model.tokenization import Encoded

MAX_SEQ_LEN = 128
REAL_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real-utterances-dev.jsonl"
"""Real user utterances, evaluation only: reported, never trained on, never in this
repository (absent in a fresh clone)."""


def load_split(path: Path, encoder: TextEncoder, labels: list[str]) -> tuple[list[Encoded], np.ndarray, np.ndarray]:
    """Encoded rows, gold label ids, and which examples are multi-turn."""
    rows, gold, multi = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        example = json.loads(line)
        turns = [(t["speaker"], t["text"]) for t in example["turns"]]
        rows.append(encoder.encode_dialogue(turns))
        gold.append(labels.index(example["intent"]))
        multi.append(len(turns) > 1)
    return rows, np.array(gold), np.array(multi)
