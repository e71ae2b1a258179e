"""Request bodies for the load: a JSONL corpus of dialogues, encoded once, cycled in a fixed order."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import orjson

# The test split: the checkout's, else the copy an installed wheel carries (pyproject.toml).
CHECKOUT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "intents" / "test.jsonl"
PACKAGED_CORPUS = Path(__file__).resolve().parent / "data" / "test.jsonl"
DEFAULT_CORPUS = CHECKOUT_CORPUS if CHECKOUT_CORPUS.is_file() else PACKAGED_CORPUS


ZIPF_DRAWS = 100_000


class Corpus:
    """Predict bodies (`{"turns": [...]}`) from a JSONL file; other keys per line are ignored.
    With `zipf`, dialogues repeat as real traffic does: the k-th most frequent (in a shuffled
    order) is drawn with weight 1 / k**zipf, instead of each once in turn."""

    def __init__(self, path: Path, *, seed: int = 0, batch_items: int = 1, zipf: float = 0.0) -> None:
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
        self.zipf = zipf
        self.seed = seed

    @property
    def multi_turn_share(self) -> float:
        return sum(len(d["turns"]) > 1 for d in self.dialogues) / len(self.dialogues)

    def sequence(self) -> list[dict[str, object]]:
        """The dialogues in the order the load sends them (one pass, then it cycles)."""
        if not self.zipf:
            return self.dialogues
        weights = [1 / rank**self.zipf for rank in range(1, len(self.dialogues) + 1)]
        return random.Random(self.seed).choices(self.dialogues, weights=weights, k=ZIPF_DRAWS)

    def bodies(self, endpoint: str) -> Iterator[bytes]:
        """Encoded request bodies for `predict`, `batch`, `oip` (the Open Inference
        Protocol's infer: one dialogue as a `text` element) or `classify` (Infinity's
        `/classify`: the dialogue as the one text batcher's bundled model reads), cycling
        forever."""
        dialogues = self.sequence()
        if endpoint == "predict":
            encoded = [orjson.dumps(d) for d in dialogues]
        elif endpoint == "oip":
            encoded = [orjson.dumps(oip_request(d)) for d in dialogues]
        elif endpoint == "classify":
            encoded = [orjson.dumps(classify_request(d)) for d in dialogues]
        else:
            cycle = itertools.cycle(dialogues)
            encoded = [
                orjson.dumps({"items": [next(cycle) for _ in range(self.batch_items)]}) for _ in range(len(dialogues))
            ]
        return itertools.cycle(encoded)


def oip_request(dialogue: dict[str, object]) -> dict[str, object]:
    """One dialogue as an Open Inference Protocol infer request: its text, or JSON turns, as
    a [1, 1] tensor (batcher takes [N] or [N, 1]; Triton with max_batch_size > 0 needs the
    batch dimension)."""
    turns = dialogue["turns"]
    assert isinstance(turns, list)
    text = turns[0]["text"] if len(turns) == 1 else json.dumps({"turns": turns}, ensure_ascii=False)
    return {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}


CLASSIFY_MAX_SEQ_LEN = 128


def classify_request(dialogue: dict[str, object]) -> dict[str, object]:
    """One dialogue as a text-classification request (`{"input": [text]}`, Infinity's
    `/classify`): the text batcher builds for the bundled model (`用户：` + the user's text,
    turns joined by [SEP]; batcher.model.dialogue), for servers that take text only."""
    from batcher.model.dialogue import char_budget, dialogue_text

    turns = dialogue["turns"]
    assert isinstance(turns, list)
    pairs = ((str(t.get("speaker", "user")), str(t["text"])) for t in turns)
    return {"input": [dialogue_text(pairs, char_budget(CLASSIFY_MAX_SEQ_LEN))]}
