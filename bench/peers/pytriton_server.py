"""PyTriton (NVIDIA Triton Inference Server driven from Python) serving the bundle for the
benchmark: Triton's HTTP front end and dynamic batcher, INSTANCES Python model instances
(each one ONNX Runtime session of THREADS threads), the same per-batch work as batcher
(common.Classifier). It speaks the Open Inference Protocol only: POST
/v2/models/intent-zh/infer with a BYTES `text` input of shape [1, 1] (the load
generator's `--endpoint oip`).

    BUNDLE=models/intent-zh GRAPH=model.int8.onnx INSTANCES=2 BATCH=32 WAIT_MS=2 \\
        .venv-peers/pytriton/bin/python -m bench.peers.pytriton_server --port 8004
"""

from __future__ import annotations

import argparse
import os
import socket

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.common import Classifier, turns_of


def infer_function() -> object:
    classifier = Classifier()

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        dialogues = [turns_of(row[0].decode("utf-8")) for row in text]
        answers = classifier.classify(dialogues)
        return {
            "intent_id": np.array([[a["intent_id"]] for a in answers], dtype=np.int64),
            "intent_name": np.array([[a["intent_name"].encode()] for a in answers], dtype=object),
            "confidence": np.array([[a["confidence"]] for a in answers], dtype=np.float32),
        }

    return infer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    args = parser.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_verbose=0,
    )
    instances = int(os.environ.get("INSTANCES", "2"))
    with Triton(config=config) as triton:
        triton.bind(
            model_name="intent-zh",
            infer_func=[infer_function() for _ in range(instances)],
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="intent_id", dtype=np.int64, shape=(1,)),
                Tensor(name="intent_name", dtype=bytes, shape=(1,)),
                Tensor(name="confidence", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=int(os.environ.get("BATCH", "32")),
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(float(os.environ.get("WAIT_MS", "2")) * 1000)),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
