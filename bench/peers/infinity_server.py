"""Infinity (infinity-emb, michaelfeil/infinity) serving the bundle for the benchmark: its
FastAPI server, its batch queue and its `optimum` engine (ONNX Runtime through Hugging Face
optimum and a transformers `text-classification` pipeline), CPU, batches of BATCH.

It reads a Hugging Face model folder, so this makes one in a temporary directory from the
bundle: GRAPH (the int8 graph batcher serves on CPU) copied as `model_quantized.onnx` (the
name its engine prefers on CPU), the bundle's `config.json` and `tokenizer.json`, and a
`tokenizer_config.json` naming the special tokens. Two things Infinity 0.0.78 needs:
- it lists a local model folder's files relative to the working directory, so it runs from
  inside the folder with `--model-id .`;
- its warm-up sends a text longer than 512 positions and its pipeline does not truncate, so
  it starts with `--no-model-warmup` (the benchmark warms it with traffic).
The graph is served as it is (`--onnx-disable-optimize`: no ORTOptimizer rewrite of it).
It takes `POST /classify` with `{"input": [text]}`: the text batcher builds from a
dialogue (`用户：` + the user's text; the load generator's `--endpoint classify`), and
answers every label's softmax score, highest first.

    BUNDLE=models/intent-zh GRAPH=model.int8.onnx BATCH=32 \\
        .venv-peers/infinity/bin/python -m bench.peers.infinity_server --port 8005

Nothing is fetched: HF_HUB_OFFLINE=1 and its usage statistics off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[2]
SPECIAL_TOKENS = {
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "mask_token": "[MASK]",
}


def model_folder(bundle: Path, graph: str, folder: Path) -> Path:
    """The Hugging Face model folder Infinity reads, made in `folder` from the bundle."""
    shutil.copyfile(bundle / graph, folder / "model_quantized.onnx")
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(bundle / name, folder / name)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, nothing rebuilt
        "model_max_length": 512,
        "padding_side": "right",
        **SPECIAL_TOKENS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return folder


def command(port: int, batch: int) -> list[str]:
    cli = Path(sys.executable).with_name("infinity_emb")
    return [
        str(cli),
        "v2",
        "--model-id",
        ".",
        "--engine",
        "optimum",
        "--device",
        "cpu",
        "--batch-size",
        str(batch),
        "--no-model-warmup",
        "--onnx-disable-optimize",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--redirect-slash",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    args = parser.parse_args()
    bundle = Path(os.environ.get("BUNDLE", ROOT / "models" / "intent-zh"))
    graph = os.environ.get("GRAPH", "model.int8.onnx")
    batch = int(os.environ.get("BATCH", "32"))
    with tempfile.TemporaryDirectory(prefix="infinity-model-") as scratch:
        folder = model_folder(bundle, graph, Path(scratch))
        env = os.environ | {
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(folder / ".hf"),
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1",
        }
        child = subprocess.Popen(command(args.port, batch), cwd=folder, env=env)

        def forward(signum: int, _frame: FrameType | None) -> None:
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
