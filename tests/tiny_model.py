"""A tiny but real BERT-shaped ONNX classifier and tokenizer, built with the onnx helper API.

Embeddings (word + position + token type), one masked self-attention layer, a [CLS] head:
the same inputs, masking and output as a TinyBERT export, small enough to build in a
fixture in milliseconds. Random weights, fixed seed: tests compare it against itself
(batched vs alone), never against expected intents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

LABELS = ["问题求助/技术支持", "闲聊", "天气查询", "音乐播放"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("用户助手：我们有空一起去看风景好不好播放周杰伦的歌今天天气怎么样明后呢换首再调暗点")
LATIN = ["hello", "world", "play", "music", "##s", "##ing", *"abcdefghijklmnopqrstuvwxyz0123456789"]


def build_tokenizer() -> Tokenizer:
    vocab = {token: index for index, token in enumerate(dict.fromkeys(SPECIALS + CHARS + LATIN))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def build_graph(
    vocab_size: int,
    num_labels: int,
    *,
    hidden: int = 16,
    max_positions: int = 512,
    token_types: bool = True,
    id_type: int = TensorProto.INT64,
) -> onnx.ModelProto:
    rng = np.random.default_rng(1234)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    initializers = [
        weight("word", vocab_size, hidden),
        weight("position", max_positions, hidden),
        weight("token_type", 2, hidden),
        weight("wq", hidden, hidden),
        weight("wk", hidden, hidden),
        weight("wv", hidden, hidden),
        weight("classifier", hidden, num_labels),
        weight("classifier_bias", num_labels),
        const("one_i", np.array(1, dtype=np.int64)),
        const("zero_i", np.array(0, dtype=np.int64)),
        const("one_f", np.array(1.0, dtype=np.float32)),
        const("neg_big", np.array(-10000.0, dtype=np.float32)),
        const("scale", np.array(1.0 / np.sqrt(hidden), dtype=np.float32)),
    ]
    if not token_types:
        initializers = [t for t in initializers if t.name != "token_type"]
        initializers.append(const("zero_f", np.array(0.0, dtype=np.float32)))
    node = helper.make_node
    nodes = [
        node("Gather", ["word", "input_ids"], ["word_emb"]),
        node("Gather", ["token_type", "token_type_ids"], ["type_emb"]),
        node("Shape", ["input_ids"], ["shape"]),
        node("Gather", ["shape", "one_i"], ["seq_len"], axis=0),
        node("Range", ["zero_i", "seq_len", "one_i"], ["positions"]),
        node("Gather", ["position", "positions"], ["pos_emb"]),
        node("Add", ["word_emb", "type_emb"] if token_types else ["word_emb", "zero_f"], ["sum1"]),
        node("Add", ["sum1", "pos_emb"], ["x"]),
        node("MatMul", ["x", "wq"], ["q"]),
        node("MatMul", ["x", "wk"], ["k"]),
        node("MatMul", ["x", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["raw_scores"]),
        node("Mul", ["raw_scores", "scale"], ["scores"]),
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("Sub", ["one_f", "mask_f"], ["inv_mask"]),
        node("Mul", ["inv_mask", "neg_big"], ["mask_bias2"]),
        node("Unsqueeze", ["mask_bias2", "one_i"], ["mask_bias"]),
        node("Add", ["scores", "mask_bias"], ["masked_scores"]),
        node("Softmax", ["masked_scores"], ["attn"], axis=-1),
        node("MatMul", ["attn", "v"], ["context"]),
        node("Tanh", ["context"], ["hidden_states"]),
        node("Gather", ["hidden_states", "zero_i"], ["cls"], axis=1),
        node("MatMul", ["cls", "classifier"], ["raw_logits"]),
        node("Add", ["raw_logits", "classifier_bias"], ["logits"]),
    ]
    if not token_types:
        nodes = [n for n in nodes if n.output[0] != "type_emb"]
    names = ("input_ids", "attention_mask", "token_type_ids") if token_types else ("input_ids", "attention_mask")
    int_input = [helper.make_tensor_value_info(name, id_type, ["batch", "sequence"]) for name in names]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])
    graph = helper.make_graph(nodes, "tiny_bert", int_input, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


BUNDLED_FORMAT = json.loads((Path(__file__).parents[1] / "models" / "intent-zh" / "batcher.json").read_text("utf-8"))
"""The bundled model's declared format (its dialogue template), which the tiny bundle copies."""


def build_bundle(
    directory: Path, *, labels: list[str] | None = None, hidden: int = 16, declared: dict[str, object] | None = None
) -> Path:
    """Write model.onnx, tokenizer.json, labels.json and batcher.json (`declared`, default
    the bundled model's dialogue format) into `directory` and return it."""
    labels = labels or LABELS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "batcher.json").write_text(
        json.dumps(BUNDLED_FORMAT if declared is None else declared, ensure_ascii=False), encoding="utf-8"
    )
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    graph = build_graph(tokenizer.get_vocab_size(), len(labels), hidden=hidden)
    onnx.save(graph, str(directory / "model.onnx"))
    (directory / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    return directory
