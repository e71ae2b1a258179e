"""mosec serving the bundle for the benchmark: its Rust HTTP ingress and dynamic batcher,
WORKERS Python worker processes (each one ONNX Runtime session of THREADS threads), the
same per-batch work as batcher (common.Classifier). POST /predict takes batcher's body.

    BUNDLE=models/intent-zh GRAPH=model.int8.onnx WORKERS=2 BATCH=32 WAIT_MS=2 \\
        .venv-peers/mosec/bin/python -m bench.peers.mosec_server --port 8003
"""

from __future__ import annotations

import os
from typing import Any

from mosec import Server, Worker

from bench.peers.common import Classifier


class Classify(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = Classifier()

    def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        dialogues = [[(t.get("speaker", "user"), t["text"]) for t in item["turns"]] for item in data]
        answers: list[dict[str, Any]] = self.classifier.classify(dialogues)
        return answers


if __name__ == "__main__":
    server = Server()
    server.append_worker(
        Classify,
        num=int(os.environ.get("WORKERS", "2")),
        max_batch_size=int(os.environ.get("BATCH", "32")),
        max_wait_time=int(os.environ.get("WAIT_MS", "2")),
        route="/predict",
    )
    server.run()
