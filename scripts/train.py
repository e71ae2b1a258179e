"""Train the bundled intent classifier and export it: `make train`.

Builds the tokenizer, trains a TinyBERT-4-shaped BERT (4 layers, hidden 312, 12 heads,
FFN 1200, 512 positions) from scratch on data/intents/train.jsonl with early stopping on
dev, exports ONNX (legacy exporter, opset 17, dynamic batch and sequence axes), checks
torch and ONNX Runtime agree on the whole test split at several batch sizes, and writes
an int8 copy by ONNX Runtime dynamic quantization. Text comes from the server's own
`batcher.dialogue.dialogue_text` and `batcher.tokenization.TextEncoder`.

    python scripts/train.py [--data data/intents] [--out models/intent-zh] [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_tokenizer import build_tokenizer  # noqa: E402
from dataset_phrases import INTENTS  # noqa: E402
from intents_split import MAX_SEQ_LEN, load_split  # noqa: E402

from batcher.tokenization import Encoded, TextEncoder  # noqa: E402
from batcher.worker import pad_batch  # noqa: E402

SEED = 20261125


class Bert(nn.Module):
    """BERT encoder with eager (explicit matmul) attention and a [CLS] classification head."""

    def __init__(
        self,
        vocab: int,
        labels: int,
        *,
        hidden: int = 312,
        layers: int = 4,
        heads: int = 12,
        ffn: int = 1200,
        positions: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.word = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position = nn.Embedding(positions, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn, dropout) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        x = self.drop(self.embed_norm(x))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.drop(pooled))


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(hidden // heads)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.norm2 = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        size = hidden // self.heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, size).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * self.scale + bias
        context = (self.drop(scores.softmax(-1)) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = self.norm1(x + self.drop(self.out(context)))
        return self.norm2(x + self.drop(self.ffn(x)))


def tensors(rows: list[Encoded], pad_id: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(array) for array in pad_batch(rows, pad_id))


def predict(model: nn.Module, rows: list[Encoded], pad_id: int, batch_size: int = 64) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            outputs.append(model(*tensors(rows[start : start + batch_size], pad_id)).numpy())
    return np.concatenate(outputs)


def progress(epoch: int, epochs: int, step: int, steps: int, loss: float, started: float) -> None:
    done = (epoch * steps + step + 1) / (epochs * steps)
    bar = "#" * int(done * 30)
    elapsed = time.monotonic() - started
    print(
        f"\r[{bar:<30}] epoch {epoch + 1}/{epochs} step {step + 1}/{steps} loss {loss:.3f} {elapsed:5.0f}s",
        end="",
        flush=True,
    )


def train(args: argparse.Namespace, encoder: TextEncoder) -> Bert:
    train_rows, train_y, _ = load_split(args.data / "train.jsonl", encoder, INTENTS)
    dev_rows, dev_y, _ = load_split(args.data / "dev.jsonl", encoder, INTENTS)
    model = Bert(encoder.vocab_size, len(INTENTS))
    steps = math.ceil(len(train_rows) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = steps * args.epochs
    warmup = steps * 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / total)
    )
    rng = random.Random(SEED)
    best, best_state, stale = -1.0, None, 0
    started = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        for step in range(steps):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            logits = model(*tensors([train_rows[i] for i in index], encoder.pad_id))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(train_y[index]), label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress(epoch, args.epochs, step, steps, loss.item(), started)
        accuracy = float((predict(model, dev_rows, encoder.pad_id).argmax(1) == dev_y).mean())
        print(f"  dev accuracy {accuracy:.4f}")
        if accuracy > best:
            best, stale = accuracy, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= args.patience:
                print(f"early stop: dev accuracy has not improved for {args.patience} epochs (best {best:.4f})")
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model


def export(model: Bert, out: Path, encoder: TextEncoder, data: Path) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = out / "model.onnx"
    sample = tensors([encoder.encode("用户：播放周杰伦的歌"), encoder.encode("用户：你好")], encoder.pad_id)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "token_type_ids")}
    torch.onnx.export(
        model,
        sample,
        str(path),
        input_names=list(dynamic),
        output_names=["logits"],
        dynamic_axes={**dynamic, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    rows, _, _ = load_split(data / "test.jsonl", encoder, INTENTS)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch_size in (1, 8, 32, 64):
        for start in range(0, len(rows), batch_size):
            ids, mask, types = pad_batch(rows[start : start + batch_size], encoder.pad_id)
            onnx_logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[
                0
            ]
            with torch.no_grad():
                torch_logits = model(*(torch.from_numpy(a) for a in (ids, mask, types))).numpy()
            worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    print(f"torch vs ONNX Runtime on the test split at batch 1/8/32/64: max abs difference {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("ONNX export disagrees with torch by more than 1e-4")
    quantize_dynamic(str(path), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
    (out / "parity.json").write_text(json.dumps({"max_abs_logit_difference": worst, "batch_sizes": [1, 8, 32, 64]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "intents", help="dataset directory")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "intent-zh", help="bundle directory to write")
    parser.add_argument("--epochs", type=int, default=40, help="most training epochs")
    parser.add_argument("--patience", type=int, default=6, help="epochs without dev improvement before stopping")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    args = parser.parse_args()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.data)
    tokenizer.save(str(args.out / "tokenizer.json"))
    encoder = TextEncoder.from_bundle(args.out, MAX_SEQ_LEN)
    print(f"tokenizer: {tokenizer.get_vocab_size()} entries")
    model = train(args, encoder)
    (args.out / "labels.json").write_text(json.dumps(INTENTS, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_size": 312,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "intermediate_size": 1200,
        "max_position_embeddings": 512,
        "vocab_size": tokenizer.get_vocab_size(),
        "type_vocab_size": 2,
        "id2label": {str(i): name for i, name in enumerate(INTENTS)},
        "label2id": {name: i for i, name in enumerate(INTENTS)},
    }
    (args.out / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    export(model, args.out, encoder, args.data)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
