"""Request bodies for the load: a JSONL corpus of dialogues, encoded once, cycled in a fixed order."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import orjson

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "intents" / "test.jsonl"


class Corpus:
    """Predict bodies (`{"turns": [...]}`) from a JSONL file; other keys per line are ignored."""

    def __init__(self, path: Path, *, seed: int = 0, batch_items: int = 1) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"loadtest: cannot read corpus {path}: {exc}") from None
        self.dialogues = [{"turns": json.loads(line)["turns"]} for line in lines if line.strip()]
        if not self.dialogues:
            raise SystemExit(f"loadtest: corpus {path} has no dialogues")
        random.Random(seed).shuffle(self.dialogues)
        self.batch_items = batch_items
        self.path = path

    @property
    def multi_turn_share(self) -> float:
        return sum(len(d["turns"]) > 1 for d in self.dialogues) / len(self.dialogues)

    def bodies(self, endpoint: str) -> Iterator[bytes]:
        """Encoded request bodies for `predict` or `batch`, cycling forever."""
        if endpoint == "predict":
            encoded = [orjson.dumps(d) for d in self.dialogues]
        else:
            cycle = itertools.cycle(self.dialogues)
            encoded = [
                orjson.dumps({"items": [next(cycle) for _ in range(self.batch_items)]})
                for _ in range(len(self.dialogues))
            ]
        return itertools.cycle(encoded)
