"""What every peer does per batch, exactly as batcher does it: dialogue text from
batcher.model.dialogue (the repository's: it needs nothing beyond the standard library; run the
peers with `python -m bench.peers.NAME` from the repository root), the bundle's tokenizer
truncating from the left at 128 tokens, padding to the batch's longest row, one ONNX
Runtime run, a softmax. Or, with INSTANT=1, no model at all (fixed logits) for the
overhead ceiling. Settings come from the environment (the peers' own command lines belong
to their frameworks): BUNDLE, GRAPH, THREADS, INSTANT."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from batcher.model.dialogue import char_budget, dialogue_text

ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 128


def turns_of(text: str) -> list[tuple[str, str]]:
    """An Open Inference Protocol element: a user's text, or JSON {"turns": [...]}."""
    if text.lstrip().startswith("{"):
        try:
            return [(t.get("speaker", "user"), t["text"]) for t in json.loads(text)["turns"]]
        except (ValueError, KeyError, TypeError):
            pass
    return [("user", text)]


class Classifier:
    def __init__(self) -> None:
        bundle = Path(os.environ.get("BUNDLE", ROOT / "models" / "intent-zh"))
        self.labels: list[str] = json.loads((bundle / "labels.json").read_text(encoding="utf-8"))
        self.instant = os.environ.get("INSTANT") == "1"
        if self.instant:
            return
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = bundle / os.environ.get("GRAPH", "model.onnx")
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LEN, direction="left")
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def classify(self, dialogues: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
        if self.instant:
            return [{"intent_id": 1, "intent_name": self.labels[1], "confidence": 1.0} for _ in dialogues]
        texts = [dialogue_text(turns, char_budget(MAX_SEQ_LEN)) for turns in dialogues]
        encodings = self.tokenizer.encode_batch(texts)
        longest = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
            types[row, : len(encoding.ids)] = encoding.type_ids
        logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return [
            {"intent_id": int(i), "intent_name": self.labels[int(i)], "confidence": float(probabilities[row, i])}
            for row, i in enumerate(best)
        ]
