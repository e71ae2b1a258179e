"""The users' old design, reproduced for the benchmark: FastAPI + uvicorn, one worker, the
model loaded once, each request tokenized, padded and run alone (one ONNX Runtime call per
request), as in the old service guide. `--padding max` pads to max_seq_length (128) like
the old server; `--padding dynamic` pads only to the request's own length, which
separates the gain of dynamic padding from the gain of batching.

    python -m bench.baselines.naive_server --model models/intent-zh --port 8001 [--padding dynamic]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer

from batcher.model.dialogue import char_budget, dialogue_text  # the same model text as batcher builds


class Turn(BaseModel):
    speaker: str = "user"
    text: str


class PredictRequest(BaseModel):
    turns: list[Turn]
    return_all_probs: bool = False


class ONNXPredictor:
    def __init__(
        self, model_dir: Path, max_seq_length: int, padding: str, threads: int, graph: str = "model.onnx"
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / graph), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_seq_length, direction="left")
        if padding == "max":
            self.tokenizer.enable_padding(length=max_seq_length)
        self.labels = json.loads((model_dir / "labels.json").read_text(encoding="utf-8"))
        self.max_chars = char_budget(max_seq_length)
        for _ in range(3):  # "the model warms up 3 times at start-up" (old guide, FAQ)
            self.predict([Turn(text="你好")], False)

    def predict(self, turns: list[Turn], return_all_probs: bool) -> dict[str, object]:
        started = time.perf_counter()
        encoding = self.tokenizer.encode(dialogue_text(((t.speaker, t.text) for t in turns), self.max_chars))
        feed = {
            "input_ids": np.array([encoding.ids], dtype=np.int64),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
        }
        logits = self.session.run(["logits"], feed)[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        result: dict[str, object] = {
            "intent_id": best,
            "intent_name": self.labels[best],
            "confidence": round(float(probs[best]), 4),
            "inference_time_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if return_all_probs:
            result["probabilities"] = {name: round(float(p), 4) for name, p in zip(self.labels, probs, strict=True)}
        return result


def create_app(predictor: ONNXPredictor) -> FastAPI:
    app = FastAPI(title="意图识别 ONNX 推理服务")

    @app.get("/")
    async def index() -> dict[str, object]:
        return {"status": "ok", "service": "意图识别 ONNX 推理服务", "model_loaded": True}

    @app.post("/predict")
    async def predict(request: PredictRequest) -> dict[str, object]:
        return predictor.predict(request.turns, request.return_all_probs)

    @app.get("/intents")
    async def intents() -> dict[str, object]:
        return {"intents": [{"id": i, "name": n} for i, n in enumerate(predictor.labels)]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/intent-zh"), help="bundle directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on")
    parser.add_argument("--padding", choices=["max", "dynamic"], default="max", help="pad to 128, or to the request")
    parser.add_argument("--max-seq-length", type=int, default=128, help="the old max_seq_length")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--graph", default="model.onnx", help="graph file in the bundle (default: %(default)s)")
    args = parser.parse_args()
    predictor = ONNXPredictor(args.model, args.max_seq_length, args.padding, args.threads, args.graph)
    uvicorn.run(create_app(predictor), host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
