"""batcher serving an instant model: fixed logits, no ONNX Runtime, for measuring what the
server itself costs per request (its overhead ceiling). Benchmark-only: no setting of the
shipped config reaches it; it is this entry point or nothing.

    python -m bench.instant_server --port 8001 [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
import uvloop

from batcher.config import load_settings
from batcher.server import serve
from bench.servers import MODEL, ROOT


class InstantModel:
    """Answers every batch at once with the same logits (intent 1); costs microseconds."""

    provider = "instant (benchmark only)"

    def __init__(self, labels: int) -> None:
        self.labels = labels

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(input_ids), self.labels), dtype=np.float32)
        logits[:, 1] = 1.0
        return logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a setting (repeatable)")
    args = parser.parse_args()
    overrides = ['server.host="127.0.0.1"', f"server.port={args.port}", *args.overrides]
    settings = load_settings(ROOT / "config.toml", overrides=overrides)
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    labels = json.loads((MODEL / "labels.json").read_text(encoding="utf-8"))
    uvloop.run(serve(settings, model=InstantModel(len(labels))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
