"""A zoo of model bundles shaped like Hugging Face exports, built without torch or transformers.

`build(spec, parent)` writes what `save_pretrained` + an ONNX exporter leave in a folder:
config.json, tokenizer.json / vocab.txt, tokenizer_config.json, special_tokens_map.json and
the graph (a tiny BERT-shaped classifier like tests/tiny_model.py, random weights, fixed
seed). `reference(...)` answers what transformers' text-classification pipeline would
(truncation=True, top_k=None), using only `tokenizers` and onnxruntime. `ZOO` lists the
standard bundles, the good ones and the broken-or-adaptable ones.

Faithfulness notes:
- RoBERTa / XLM-R graphs offset positions by 2 (padding_idx + 1), as those models do, so
  their usable length is max_positions - 2 (the ZOO's specs use 514, as roberta-base's
  config.json says, with model_max_length 512).
- The XLM-R normalizer is NFKC + collapse repeated spaces: the real one is a
  `Precompiled` sentencepiece charsmap (nmt_nfkc), which cannot be built from Python.
- fp16 graphs take int64 ids and return float16 outputs (as `.half()` + torch export,
  or onnxconverter-common without keep_io_types, do).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import (
    AddedToken,
    BertWordPieceTokenizer,
    Encoding,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

TokenizerKind = Literal["wordpiece", "wordpiece_cased_vocab", "bpe", "unigram"]
Function = Literal["softmax", "sigmoid", "none"]
HIDDEN = 16

INTENTS = [
    "play_music", "set_alarm", "weather", "navigate", "chitchat", "tech_support",
    "news", "translate", "order_food", "smart_home", "check_order", "reminder",
]  # fmt: skip

CORPUS = [
    "Play some music by Jay Chou.",
    "Set an alarm for seven tomorrow morning.",
    "What's the weather like in Beijing today?",
    "Will it rain this afternoon?",
    "Navigate to the nearest gas station, please.",
    "How long does it take to drive to the airport?",
    "Tell me a joke, I am bored.",
    "My laptop won't turn on after the update.",
    "How do I reset my password?",
    "Read me the latest news headlines.",
    "Translate good morning into French.",
    "Order two bowls of beef noodles for lunch.",
    "Turn off the living room lights.",
    "Dim the bedroom lamp a little.",
    "Where is my order? It was shipped yesterday.",
    "Remind me to call mom at 8 pm.",
    "Skip this song and play the next one.",
    "Is it going to be sunny on the weekend?",
    "Thanks, that was really helpful!",
    "Hello there, how are you doing?",
    "播放周杰伦的歌。",
    "明天早上七点叫我起床。",
    "周末杭州的气温大概多少度？",
    "下午会下雨吗？",
    "导航到最近的加油站。",
    "给我讲个笑话吧，好无聊。",
    "我的电脑更新以后开不了机。",
    "怎么重置密码？",
    "读一下今天的新闻。",
    "把早上好翻译成法语。",
    "帮我点两碗牛肉面当午饭。",
    "关掉客厅的灯，再把卧室的灯调暗一点。",
    "我的快递到哪里了？昨天已经发货了。",
    "提醒我晚上八点给妈妈打电话。",
    "换首歌，播放下一首。",
    "周末是晴天吗？我们一起去看风景好不好。",
    "谢谢，你真的帮了大忙！",
    "你好，最近怎么样？",
]
SUFFIXES = ["##s", "##ed", "##ing", "##er", "##ly", "##'s", "##n't"]


@dataclass(frozen=True)
class Spec:
    name: str
    tokenizer: TokenizerKind = "wordpiece"
    num_labels: int = 4
    problem_type: str | None = None
    token_types: bool = True
    final: Literal["logits", "softmax", "sigmoid"] = "logits"
    outputs: tuple[str, ...] = ("logits",)
    static_seq_len: int | None = None
    static_batch: int | None = None
    max_positions: int = 512
    vocab_size_in_graph: int | None = None
    id_type: int = TensorProto.INT64
    fp16: bool = False
    file: str = "model.onnx"
    external_data: bool = False
    model_max_length: int | None = 128
    model_type: str = "bert"
    labels_file: bool = False
    declared: dict[str, Any] | None = None
    seed: int = 1234
    labels: tuple[str, ...] | None = None
    """Label names, overriding num_labels (default: INTENTS[:num_labels], or LABEL_0 when num_labels == 1)."""
    quantized: bool = False
    """Dynamically quantize the graph (MatMulInteger, as optimum's ORTQuantizer does)."""

    @property
    def label_names(self) -> list[str]:
        if self.labels is not None:
            return list(self.labels)
        if self.num_labels == 1:
            return ["LABEL_0"]
        return [INTENTS[i] if i < len(INTENTS) else f"LABEL_{i}" for i in range(self.num_labels)]


# --------------------------------------------------------------------------- tokenizers

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _words(cased: bool) -> list[str]:
    english = " ".join(line for line in CORPUS if line.isascii())
    words: dict[str, None] = {}
    for raw in english.replace("'", " ' ").split():
        word = "".join(ch for ch in raw if ch.isalnum())
        if word:
            words[word.lower()] = None
            if cased:
                words[word] = None
                words[word.lower().capitalize()] = None
    return list(words)


def wordpiece_vocab(*, cased: bool) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz" + ("ABCDEFGHIJKLMNOPQRSTUVWXYZ" if cased else "")
    punctuation = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~，。？！：；、（）《》“”")
    chinese = dict.fromkeys(ch for line in CORPUS for ch in line if "\u4e00" <= ch <= "\u9fff")
    tokens = [
        *BERT_SPECIALS, *punctuation, *"0123456789", *letters, *(f"##{c}" for c in letters + "0123456789"),
        *SUFFIXES, *_words(cased), *chinese,
    ]  # fmt: skip
    return list(dict.fromkeys(tokens))


def _bert_tokenizer(vocab: list[str]) -> Tokenizer:
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(BERT_SPECIALS)
    return tokenizer


def _roberta_like(tokenizer: Tokenizer, trainer: trainers.Trainer) -> Tokenizer:
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return tokenizer


def _specials() -> list[str | AddedToken]:
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    return [*ROBERTA_SPECIALS[:-1], mask]


def build_tokenizer(kind: TokenizerKind) -> Tokenizer:
    if kind in ("wordpiece", "wordpiece_cased_vocab"):
        return _bert_tokenizer(wordpiece_vocab(cased=kind == "wordpiece_cased_vocab"))
    if kind == "bpe":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        bpe.decoder = decoders.ByteLevel()
        bpe_trainer = trainers.BpeTrainer(
            vocab_size=700,
            special_tokens=_specials(),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        return _roberta_like(bpe, bpe_trainer)
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=_specials(), unk_token="<unk>", show_progress=False
    )
    unigram = _roberta_like(unigram, trainer)
    # The trainer picks a stable set of pieces, but its scores wobble in the last digits from
    # run to run (hash-map order): rescore the pieces from corpus counts, deterministically.
    trained = json.loads(unigram.to_str())["model"]["vocab"]
    words = [
        word
        for line in CORPUS
        for word, _ in unigram.pre_tokenizer.pre_tokenize_str(unigram.normalizer.normalize_str(line))
    ]
    counts = {piece: sum(word.count(piece) for word in words) for piece, _ in trained[len(ROBERTA_SPECIALS) :]}
    total = sum(counts.values())
    pieces = sorted(((piece, float(np.log((count + 1) / total))) for piece, count in counts.items()), key=_rank)
    unigram.model = models.Unigram([(token, 0.0) for token in ROBERTA_SPECIALS] + pieces, unk_id=3, byte_fallback=False)
    return unigram


def _rank(item: tuple[str, float]) -> tuple[float, str]:
    return -item[1], item[0]


# --------------------------------------------------------------------------- graph

POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def build_graph(spec: Spec, vocab_size: int) -> onnx.ModelProto:
    """The tiny classifier of tests/tiny_model.py with the spec's variations."""
    rng = np.random.default_rng(spec.seed)
    float_type, float_np = (TensorProto.FLOAT16, np.float16) if spec.fp16 else (TensorProto.FLOAT, np.float32)
    num_labels = len(spec.label_names)
    rows = spec.vocab_size_in_graph or vocab_size

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(float_np), name)

    def const(name: str, value: Any, dtype: Any = np.int64) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    initializers = [
        weight("word", rows, HIDDEN),
        weight("position", spec.max_positions, HIDDEN),
        weight("token_type", 2, HIDDEN),
        weight("wq", HIDDEN, HIDDEN),
        weight("wk", HIDDEN, HIDDEN),
        weight("wv", HIDDEN, HIDDEN),
        weight("classifier", HIDDEN, num_labels),
        weight("classifier_bias", num_labels),
        const("one_i", 1),
        const("zero_i", 0),
        const("offset_i", POSITION_OFFSET.get(spec.model_type, 0)),
        const("one_f", 1.0, float_np),
        const("neg_big", -10000.0, float_np),
        const("scale", 1.0 / np.sqrt(HIDDEN), float_np),
    ]
    node = helper.make_node
    nodes = [node("Gather", ["word", "input_ids"], ["word_emb0"])]
    if spec.static_seq_len is None:
        nodes += [
            node("Identity", ["word_emb0"], ["word_emb"]),
            node("Shape", ["input_ids"], ["shape"]),
            node("Gather", ["shape", "one_i"], ["seq_len"], axis=0),
            node("Range", ["zero_i", "seq_len", "one_i"], ["range"]),
        ]
    else:  # the length is baked in, as in a torch export with fixed shapes: any other fails, 1 included
        initializers += [
            const("static_shape", [0, spec.static_seq_len, HIDDEN]),
            const("range", np.arange(spec.static_seq_len)),
        ]
        nodes.append(node("Reshape", ["word_emb0", "static_shape"], ["word_emb"]))
    nodes += [
        node("Add", ["range", "offset_i"], ["positions"]),
        node("Gather", ["position", "positions"], ["pos_emb"]),
    ]
    if spec.token_types:
        nodes += [
            node("Gather", ["token_type", "token_type_ids"], ["type_emb"]),
            node("Add", ["word_emb", "type_emb"], ["sum1"]),
        ]
    else:
        initializers = [t for t in initializers if t.name != "token_type"]
        nodes.append(node("Identity", ["word_emb"], ["sum1"]))
    nodes.append(node("Add", ["sum1", "pos_emb"], ["x"]))
    nodes += [
        node("MatMul", ["x", "wq"], ["q"]),
        node("MatMul", ["x", "wk"], ["k"]),
        node("MatMul", ["x", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["qk"]),
        node("Mul", ["qk", "scale"], ["qk_scaled"]),
        node("Cast", ["attention_mask"], ["mask_f"], to=float_type),
        node("Sub", ["one_f", "mask_f"], ["inv_mask"]),
        node("Mul", ["inv_mask", "neg_big"], ["mask_bias2"]),
        node("Unsqueeze", ["mask_bias2", "one_i"], ["mask_bias"]),
        node("Add", ["qk_scaled", "mask_bias"], ["masked_scores"]),
        node("Softmax", ["masked_scores"], ["attn"], axis=-1),
        node("MatMul", ["attn", "v"], ["context"]),
        node("Tanh", ["context"], ["hidden_states"]),
        node("Gather", ["hidden_states", "zero_i"], ["cls0"], axis=1),
    ]
    if spec.static_batch is not None:
        initializers.append(const("batch_shape", [spec.static_batch, HIDDEN]))
        nodes.append(node("Reshape", ["cls0", "batch_shape"], ["cls"]))
    else:
        nodes.append(node("Identity", ["cls0"], ["cls"]))
    *embedding, scores = spec.outputs
    final = {"logits": "Identity", "softmax": "Softmax", "sigmoid": "Sigmoid"}[spec.final]
    nodes += [
        node("MatMul", ["cls", "classifier"], ["raw_logits"]),
        node("Add", ["raw_logits", "classifier_bias"], ["head"]),
        node(final, ["head"], [scores], axis=-1) if final == "Softmax" else node(final, ["head"], [scores]),
    ]
    if embedding:
        nodes.append(node("Identity", ["cls"], [embedding[0]]))

    batch: int | str = spec.static_batch or "batch_size"
    seq: int | str = spec.static_seq_len or "sequence_length"
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if spec.token_types else [])
    inputs = [helper.make_tensor_value_info(name, spec.id_type, [batch, seq]) for name in names]
    outputs = [
        helper.make_tensor_value_info(name, float_type, [batch, HIDDEN if name in embedding else num_labels])
        for name in spec.outputs
    ]
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- bundle files

ARCHITECTURES = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification",
    "albert": "AlbertForSequenceClassification",
}


def _config(spec: Spec, vocab_size: int) -> dict[str, Any]:
    labels = spec.label_names
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES.get(spec.model_type, "BertForSequenceClassification")],
        "model_type": spec.model_type,
        "hidden_size": HIDDEN,
        "num_attention_heads": 1,
        "num_hidden_layers": 1,
        "intermediate_size": HIDDEN,
        "hidden_act": "gelu",
        "max_position_embeddings": spec.max_positions,
        "vocab_size": spec.vocab_size_in_graph or vocab_size,
        "pad_token_id": 1 if spec.tokenizer in ("bpe", "unigram") else 0,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "torch_dtype": "float16" if spec.fp16 else "float32",
        "transformers_version": "4.44.2",
    }
    if spec.model_type != "distilbert":
        config["type_vocab_size"] = 1 if spec.model_type in POSITION_OFFSET else 2
    if spec.tokenizer in ("bpe", "unigram"):
        config |= {"bos_token_id": 0, "eos_token_id": 2}
    if spec.problem_type is not None:
        config["problem_type"] = spec.problem_type
    return config


def _special_tokens(kind: TokenizerKind) -> dict[str, str]:
    if kind in ("bpe", "unigram"):
        return {
            "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
            "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
        }  # fmt: skip
    return {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }


def _tokenizer_config(spec: Spec, tokenizer: Tokenizer) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if spec.tokenizer != "wordpiece_cased_vocab":  # what transformers >= 4.34 writes
        config["added_tokens_decoder"] = {
            str(index): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for index, token in sorted(tokenizer.get_added_tokens_decoder().items())
        }
    config["clean_up_tokenization_spaces"] = True
    config |= _special_tokens(spec.tokenizer)
    if spec.tokenizer == "bpe":
        config |= {"add_prefix_space": False, "errors": "replace", "trim_offsets": True}
        config["tokenizer_class"] = "RobertaTokenizer"
    elif spec.tokenizer == "unigram":
        config["tokenizer_class"] = "XLMRobertaTokenizer"
    else:
        lower = spec.tokenizer == "wordpiece"
        config |= {"do_lower_case": lower, "strip_accents": None, "tokenize_chinese_chars": True}
        config["tokenizer_class"] = "DistilBertTokenizer" if spec.model_type == "distilbert" else "BertTokenizer"
    if spec.model_max_length is not None:
        config["model_max_length"] = spec.model_max_length
    return dict(sorted(config.items()))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build(spec: Spec, parent: Path) -> Path:
    """Write the bundle `parent/spec.name` and return its path."""
    directory = parent / spec.name
    graph_path = directory / spec.file
    graph_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    _write_json(directory / "config.json", _config(spec, vocab_size))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(spec, tokenizer))
    _write_json(directory / "special_tokens_map.json", _special_tokens(spec.tokenizer))
    if spec.tokenizer != "wordpiece_cased_vocab":
        tokenizer.save(str(directory / "tokenizer.json"))
    if spec.tokenizer.startswith("wordpiece"):
        vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        (directory / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    elif spec.tokenizer == "bpe":  # RobertaTokenizerFast.save_pretrained writes these too
        tokenizer.model.save(str(directory))
    if spec.labels_file:
        _write_json(directory / "labels.json", spec.label_names)
    if spec.declared is not None:
        _write_json(directory / "batcher.json", spec.declared)

    model = build_graph(spec, vocab_size)
    if spec.quantized:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quiet "Please consider to run pre-processing before quantization"
        try:
            quantize_dynamic(model, graph_path, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        model = onnx.load(str(graph_path))
    if spec.external_data:
        location = graph_path.name + ".data"
        onnx.save(model, str(graph_path), save_as_external_data=True, location=location)
    else:
        onnx.save(model, str(graph_path))
    return directory


# --------------------------------------------------------------------------- reference


def graph_file(bundle: Path) -> Path:
    """The bundle's one ONNX file, at the top or under onnx/."""
    found = sorted(bundle.glob("*.onnx")) + sorted(bundle.glob("onnx/*.onnx"))
    if len(found) != 1:
        raise ValueError(f"expected one .onnx file in {bundle}, found {[str(f) for f in found]}")
    return found[0]


def load_tokenizer(bundle: Path) -> Tokenizer:
    """tokenizer.json, or what transformers converts a vocab.txt-only BERT tokenizer into."""
    if (bundle / "tokenizer.json").exists():
        return Tokenizer.from_file(str(bundle / "tokenizer.json"))
    settings = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
    wordpiece = BertWordPieceTokenizer(str(bundle / "vocab.txt"), lowercase=settings.get("do_lower_case", True))
    tokenizer: Tokenizer = wordpiece._tokenizer
    return tokenizer


def pipeline_function(bundle: Path) -> Function:
    """The function transformers' text-classification pipeline applies by default."""
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    problem, num_labels = config.get("problem_type"), len(config["id2label"])
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def encode(bundle: Path, text: str | tuple[str, str], *, max_length: int) -> Encoding:
    tokenizer = load_tokenizer(bundle)
    tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
    return tokenizer.encode(*text) if isinstance(text, tuple) else tokenizer.encode(text)


def reference(
    bundle: Path, text: str | tuple[str, str], *, max_length: int, function: Function, file: str | None = None
) -> dict[str, float]:
    """Label -> score for one text (or pair), as the pipeline would answer. A graph with a
    fixed sequence length gets the row right-padded to it (padding is masked out)."""
    encoding = encode(bundle, text, max_length=max_length)
    ids, mask, types = list(encoding.ids), list(encoding.attention_mask), list(encoding.type_ids)
    session = ort.InferenceSession(
        str(bundle / file if file else graph_file(bundle)), providers=["CPUExecutionProvider"]
    )
    fixed = session.get_inputs()[0].shape[1]
    if isinstance(fixed, int) and fixed > len(ids):
        settings = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
        pad = load_tokenizer(bundle).token_to_id(settings.get("pad_token", "[PAD]")) or 0
        extra = fixed - len(ids)
        ids, mask, types = ids + [pad] * extra, mask + [0] * extra, types + [0] * extra
    columns = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    feed = {
        arg.name: np.array([columns[arg.name]], dtype=np.int32 if arg.type == "tensor(int32)" else np.int64)
        for arg in session.get_inputs()
    }
    names = [out.name for out in session.get_outputs()]
    wanted = "logits" if "logits" in names else names[-1]
    (scores,) = session.run([wanted], feed)
    row = np.asarray(scores[0], dtype=np.float64)
    if function == "softmax":
        exp = np.exp(row - row.max())
        row = exp / exp.sum()
    elif function == "sigmoid":
        row = 1.0 / (1.0 + np.exp(-row))
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    return {config["id2label"][str(i)]: float(value) for i, value in enumerate(row)}


# --------------------------------------------------------------------------- the zoo

ZOO: list[Spec] = [
    Spec("bert-plain"),
    Spec("bert-no-token-types", token_types=False),
    Spec("bert-cased-vocab-only", tokenizer="wordpiece_cased_vocab", num_labels=3),
    Spec("roberta-bpe", "bpe", 3, token_types=False, max_positions=514, model_max_length=512, model_type="roberta"),
    Spec(
        "xlmr-unigram", "unigram", token_types=False, max_positions=514, model_max_length=512, model_type="xlm-roberta"
    ),
    Spec("multi-label", num_labels=5, problem_type="multi_label_classification"),
    Spec("one-logit", num_labels=1),
    Spec("final-softmax", final="softmax"),
    Spec("final-sigmoid-multi-label", final="sigmoid", num_labels=5, problem_type="multi_label_classification"),
    Spec("pair", labels=("different", "same")),
    Spec("external-data", external_data=True),
    Spec("int32-ids", id_type=TensorProto.INT32),
    Spec("two-outputs", outputs=("embedding", "scores")),
    Spec("static-seq-32", static_seq_len=32),
    Spec("static-batch-1", static_batch=1),
    Spec("max-positions-64", max_positions=64, model_max_length=512),
    Spec("vocab-too-large", vocab_size_in_graph=100),
    Spec("fp16-only", fp16=True, file="model.fp16.onnx"),
    Spec("quantized-only", file="model_quantized.onnx", quantized=True),
    Spec("onnx-subfolder", file="onnx/model.onnx"),
]
"""The standard bundles. Broken or adaptable: static-seq-32 (fixed [batch, 32]),
static-batch-1 ([1, seq]), max-positions-64 (tokenizer allows 512, the graph 64),
vocab-too-large (graph table of 100 rows), fp16-only, quantized-only, onnx-subfolder."""

BY_NAME = {spec.name: spec for spec in ZOO}
