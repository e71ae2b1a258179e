"""Bring your own model: `make byom` (or `python -m bench.byom`, from .venv-byom).

Builds tiny, randomly initialised Hugging Face `transformers` sequence classifiers of the
families users bring (BERT, DistilBERT, ALBERT, RoBERTa, XLM-R; single-label, multi-label,
one logit, sentence pairs), each with a tokenizer trained here on a small built-in corpus
of Chinese and English sentences: nothing comes from a model hub (HF_HUB_OFFLINE=1). Each
bundle is what `save_pretrained` writes (config.json, tokenizer.json, tokenizer_config.json)
plus a model.onnx exported with `torch.onnx.export` (the TorchScript exporter, opset 17,
dynamic batch and sequence; one with the dynamo exporter, which writes model.onnx.data).

Each bundle is then served by batcher, started as `python app.py --set model.path=DIR
--port P` with nothing else set, and its answers are compared with transformers' own
`pipeline("text-classification", truncation=True, top_k=None)` on the same inputs, model
and tokenizer loaded back from the bundle: every label's score within 1e-4 (4-decimal
`probabilities` against the reference rounded alike), and the labels in the same order.
Inputs: short and long (past model_max_length, so truncation counts), Chinese, English
with capitals, accents, emoji, a newline; pairs for the pair model. Writes
bench/results/byom.json; exits 1 if any comparison fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import ROOT, free_port, provenance

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "bench" / "results" / "byom.json"
TOLERANCE = 1e-4
SLACK = 1e-9
"""Float error in a difference of two 4-decimal numbers: 0.1235 - 0.1234 is 1.0000000000000286e-04."""
READY_TIMEOUT_S = 120.0
SEED = 20261206

CORPUS = (
    "我们有空一起去看风景好不好",
    "播放周杰伦的歌",
    "帮我订一张明天去上海的火车票",
    "明天上海会不会刮大风，要带伞吗",
    "我的快递到哪里了？已经三天没有更新了",
    "请把客厅的灯关掉",
    "这家餐厅的菜太难吃了，服务也很差",
    "谢谢你，你真是帮了大忙",
    "我想取消我的订单",
    "附近有什么好吃的火锅店",
    "开头很重要，结尾也一样重要。",
    "表情符号很有趣 😀🎉",
    "Hello there, how are you doing today?",
    "Please cancel my order, it arrived broken.",
    "What is the weather like in Beijing tomorrow?",
    "Book a table for two at seven o'clock.",
    "The Quick Brown Fox Jumps Over The Lazy Dog.",
    "I LOVE this product, it works GREAT!",
    "Turn off the lights in the living room.",
    "Where is my package? It has not moved for three days.",
    "Café naïve résumé: accents are tricky.",
    "Numbers like 12345, 3.14 and 2026-12-06 appear too.",
    "Emoji make everything better 😀🎉🦊",
    "混合 mixed 语言 language 的 sentence 句子",
    "帮我 play some jazz 音乐 please",
    "The beginning matters, and so does the end.",
)

LONG_ZH = "开头说的是天气和火车票。" + "这是一个很长很长的句子，用来测试截断。" * 40 + "结尾才说要取消订单！"
LONG_EN = (
    "START: the weather is lovely. "
    + "This is a long sentence that keeps going to test truncation. " * 60
    + "END: CANCEL MY ORDER!"
)
TEXTS = (
    "你好",
    "Hi",
    "我想订一张明天从北京到上海的火车票，最好是上午出发的。",
    "Please CANCEL my Order #12345 - it's WRONG!",
    "今天天气真好 😀🎉 let's go hiking",
    "The Quick Brown Fox Jumps Over The Lazy Dog.",
    "Ünïcödé àccents: café, naïve, résumé",
    "Line one\nline two\twith a tab",
    "Numbers 1234567890, 3.14159 and 2026-12-06",
    LONG_ZH,
    LONG_EN,
    LONG_ZH + " " + LONG_EN,
)
PAIRS = (
    ("你好", "Hello there!"),
    ("我想订火车票", "I want to book a train ticket."),
    ("Is it RAINING in Beijing?", "北京明早会下雪吗 ☔"),
    ("😀🎉", "表情符号"),
    (LONG_ZH, "short one"),
    ("short one", LONG_EN),
    (LONG_ZH, LONG_EN),
    (LONG_EN, "取消订单"),
)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Spec:
    """One model to build, export, serve and check."""

    name: str
    family: str
    """bert | distilbert | albert | roberta | xlm-roberta"""
    labels: tuple[str, ...] | None
    """id2label names; None keeps transformers' LABEL_i."""
    num_labels: int = 0
    problem_type: str | None = None
    pair: bool = False
    exporter: str = "torchscript"
    """torchscript (torch.onnx.export dynamo=False, opset 17) | dynamo (dynamo=True, its default opset)"""
    max_length: int = 128
    cased: bool = False
    vocab_only: bool = False
    """Keep only vocab.txt and tokenizer_config.json (no tokenizer.json), as old BERT checkpoints ship."""
    note: str = ""


SPECS = (
    Spec("bert", "bert", ("greeting", "question", "complaint", "订票", "其他"), note="5 named labels, softmax"),
    Spec(
        "bert-dynamo",
        "bert",
        ("greeting", "question", "complaint", "订票", "其他"),
        exporter="dynamo",
        note="the same BERT through the dynamo exporter (model.onnx.data)",
    ),
    Spec("distilbert", "distilbert", ("negative", "neutral", "positive"), note="no token_type_ids"),
    Spec("albert", "albert", ("a", "b", "c", "d"), note="Unigram (SentencePiece-style) tokenizer"),
    Spec("roberta", "roberta", ("neg", "pos", "mixed"), note="byte-level BPE, no token_type_ids"),
    Spec("xlm-roberta", "xlm-roberta", None, num_labels=2, max_length=512, note="Unigram, LABEL_0/1, 512 tokens"),
    Spec(
        "bert-multilabel",
        "bert",
        ("billing", "delivery", "refund", "praise"),
        problem_type="multi_label_classification",
        note="sigmoid per label",
    ),
    Spec("bert-one-logit", "bert", None, num_labels=1, note="num_labels=1: sigmoid of one logit"),
    Spec("bert-pair", "bert", ("entailment", "neutral", "contradiction"), pair=True, note="sentence pairs"),
    Spec(
        "bert-cased-vocab",
        "bert",
        ("x", "y", "z"),
        cased=True,
        vocab_only=True,
        note="cased vocab.txt + tokenizer_config.json only",
    ),
)


@dataclass
class Outcome:
    """One request shape against one model: the largest |delta| over its inputs, or why it failed."""

    model: str
    exporter: str
    shape: str
    requests: int = 0
    max_delta: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures and self.requests > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "exporter": self.exporter,
            "shape": self.shape,
            "requests": self.requests,
            "max_delta": self.max_delta,
            "passed": self.passed,
            "failures": self.failures[:5],
            "failed_requests": len(self.failures),
        }


def log(message: str) -> None:
    print(message, flush=True)


# --- building ------------------------------------------------------------------------


def train_tokenizer(spec: Spec, directory: Path) -> Any:
    """A transformers tokenizer for the family, its vocabulary trained here with `tokenizers`."""
    import transformers
    from tokenizers import AddedToken
    from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer
    from tokenizers.implementations.byte_level_bpe import ByteLevelBPETokenizer
    from tokenizers.implementations.sentencepiece_unigram import SentencePieceUnigramTokenizer

    corpus = [*CORPUS, *TEXTS[:9]]
    common = {"model_max_length": spec.max_length}
    if spec.family in ("bert", "distilbert"):
        wordpiece = BertWordPieceTokenizer(lowercase=not spec.cased)
        wordpiece.train_from_iterator(
            iter(corpus),
            vocab_size=400,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False,
        )
        vocab = wordpiece.get_vocab()
        if spec.vocab_only:
            vocab_file = directory / "vocab.txt"
            vocab_file.write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.__getitem__)), "utf-8")
            return transformers.BertTokenizer(vocab=str(vocab_file), do_lower_case=not spec.cased, **common)
        cls = transformers.DistilBertTokenizerFast if spec.family == "distilbert" else transformers.BertTokenizerFast
        return cls(vocab=vocab, do_lower_case=not spec.cased, **common)
    if spec.family == "roberta":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            iter(corpus),
            vocab_size=500,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            show_progress=False,
        )
        model = json.loads(bpe.to_str())["model"]
        merges = [tuple(merge) for merge in model["merges"]]
        return transformers.RobertaTokenizerFast(vocab=model["vocab"], merges=merges, **common)
    specials: list[str | AddedToken]
    if spec.family == "xlm-roberta":
        specials, cls = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], transformers.XLMRobertaTokenizerFast
    elif spec.family == "albert":
        specials, cls = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], transformers.AlbertTokenizerFast
        corpus = [text.lower() for text in corpus]  # ALBERT lowercases before its pieces
    else:
        raise ValueError(spec.family)
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        iter(corpus), vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    pieces = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    return cls(vocab=pieces, **common)


def build_model(spec: Spec, tokenizer: Any) -> Any:
    import torch
    import transformers

    labels: dict[str, Any] = {"num_labels": spec.num_labels}
    if spec.labels is not None:
        labels = {"id2label": dict(enumerate(spec.labels)), "label2id": {n: i for i, n in enumerate(spec.labels)}}
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "problem_type": spec.problem_type,
        # Wider than transformers' 0.02, so that the scores move with the input and a wrong
        # token, a wrong truncation or a dropped segment id shows in the comparison.
        "initializer_range": 0.4,
        **labels,
    }
    if spec.family == "bert":
        config: Any = transformers.BertConfig(**TINY, max_position_embeddings=spec.max_length, **common)
        model_class: Any = transformers.BertForSequenceClassification
    elif spec.family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=spec.max_length, **common
        )
        model_class = transformers.DistilBertForSequenceClassification
    elif spec.family == "albert":
        config = transformers.AlbertConfig(**TINY, embedding_size=16, max_position_embeddings=spec.max_length, **common)
        model_class = transformers.AlbertForSequenceClassification
    elif spec.family in ("roberta", "xlm-roberta"):
        config_class = transformers.RobertaConfig if spec.family == "roberta" else transformers.XLMRobertaConfig
        config = config_class(
            **TINY,
            type_vocab_size=1,
            max_position_embeddings=spec.max_length + 2,  # positions start after the padding id
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
        model_class = (
            transformers.RobertaForSequenceClassification
            if spec.family == "roberta"
            else transformers.XLMRobertaForSequenceClassification
        )
    else:
        raise ValueError(spec.family)
    torch.manual_seed(SEED)
    return model_class(config).eval()


def export(spec: Spec, model: Any, tokenizer: Any, path: Path) -> list[str]:
    """model.onnx with the inputs the tokenizer gives and the model takes; output `logits`."""
    import inspect

    import torch

    accepted = inspect.signature(model.forward).parameters
    names = [name for name in INPUT_NAMES if name in tokenizer.model_input_names and name in accepted]
    sample = tokenizer(["你好 hello world", "a"], ["second segment", "b"] if spec.pair else None, padding=True)
    kwargs = {name: torch.tensor(sample[name], dtype=torch.int64) for name in names}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if spec.exporter == "dynamo":
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=spec.max_length)
            torch.onnx.export(
                model,
                (),
                str(path),
                kwargs=kwargs,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                dynamo=True,
                verbose=False,
            )
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            torch.onnx.export(
                model,
                (),
                str(path),
                kwargs=kwargs,
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    return names


def build_bundle(spec: Spec, directory: Path) -> dict[str, Any]:
    """The bundle directory: what save_pretrained writes, plus model.onnx."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec, directory)
    model = build_model(spec, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if spec.vocab_only:
        (directory / "tokenizer.json").unlink(missing_ok=True)
        (directory / "special_tokens_map.json").unlink(missing_ok=True)
    started = time.perf_counter()
    inputs = export(spec, model, tokenizer, directory / "model.onnx")
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    opset = next((entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")), 0)
    return {
        "inputs": inputs,
        "opset": opset,
        "export_s": round(time.perf_counter() - started, 1),
        "files": sorted(path.name for path in directory.iterdir()),
        "labels": list(model.config.id2label.values()),
        "model_max_length": tokenizer.model_max_length,
        "vocab_size": len(tokenizer),
        "tokenizer": type(tokenizer).__name__,
    }


# --- the reference -------------------------------------------------------------------

Scores = list[dict[str, Any]]


@dataclass
class Reference:
    """transformers' pipeline on the bundle: model and tokenizer loaded back from it."""

    directory: Path
    classify: Callable[[Any], Any] = field(init=False)

    def __post_init__(self) -> None:
        import transformers

        model = transformers.AutoModelForSequenceClassification.from_pretrained(self.directory).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.directory)
        self.classify = transformers.pipeline(
            "text-classification", model=model, tokenizer=tokenizer, truncation=True, top_k=None, device="cpu"
        )

    def text(self, text: str) -> Scores:
        return flat(self.classify(text))

    def pair(self, text: str, text_pair: str) -> Scores:
        return flat(self.classify({"text": text, "text_pair": text_pair}))


def flat(result: Any) -> Scores:
    """One input's scores: transformers 5 answers a lone string with top_k=None as [[...]]."""
    if isinstance(result, list) and len(result) == 1 and isinstance(result[0], list):
        result = result[0]
    if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
        raise TypeError(f"unexpected pipeline output {result!r:.200}")
    return result


# --- the server ----------------------------------------------------------------------


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """batcher on `directory` with nothing else set; its URL once GET /readyz is 200."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("BATCHER_")}
    args = [sys.executable, "app.py", "--set", f"model.path={directory}", "--port", str(port)]
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def server_log() -> str:
            log_file.seek(0)
            return log_file.read().decode(errors="replace")[-2000:]

        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}: {server_log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"GET /readyz not 200 after {READY_TIMEOUT_S:.0f} s: {server_log()}")
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


class HTTPFailure(Exception):
    pass


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + "/predict", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise HTTPFailure(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:200]}") from None


# --- comparing -----------------------------------------------------------------------


def compare_probabilities(reference: Scores, got: Any) -> float:
    """`probabilities` ({label: score} to 4 decimals) against the reference rounded alike."""
    if not isinstance(got, dict):
        raise ValueError(f"probabilities is {type(got).__name__}, not an object")
    expected = {item["label"]: round(float(item["score"]), 4) for item in reference}
    if set(got) != set(expected):
        raise ValueError(f"labels {sorted(got)} != {sorted(expected)}")
    return max(abs(expected[label] - float(got[label])) for label in expected)


def compare_ranked(reference: Scores, got: Any) -> float:
    """A list of {label, score}, highest first, at full precision, against the pipeline's."""
    if not isinstance(got, list) or not all(isinstance(item, dict) for item in got):
        raise ValueError(f"expected a list of {{label, score}}, got {json.dumps(got)[:120]}")
    expected = {item["label"]: float(item["score"]) for item in reference}
    labels = [item.get("label") for item in got]
    if sorted(map(str, labels)) != sorted(expected):
        raise ValueError(f"labels {labels} != {list(expected)}")
    delta = max(abs(expected[item["label"]] - float(item["score"])) for item in got)
    for position, item in enumerate(reference):
        # Same order, but for labels whose scores tie within the tolerance.
        tie = abs(expected[str(labels[position])] - item["score"]) <= TOLERANCE
        if labels[position] != item["label"] and not tie:
            raise ValueError(f"label order {labels} != {[entry['label'] for entry in reference]}")
    return delta


def check(outcome: Outcome, what: str, url: str, body: dict[str, Any], expected: Any) -> None:
    """POST the body and compare the answer in the outcome's way: `probabilities` (text,
    turns), a ranked list (inputs) or a list of ranked lists (a batch of inputs)."""
    outcome.requests += 1
    try:
        answer = post(url, body)
        if "inputs" not in body:
            delta = compare_probabilities(expected, answer["probabilities"])
        elif outcome.shape.endswith("batch"):
            delta = compare_batch(expected, answer)
        else:
            delta = compare_ranked(expected, answer)
    except (HTTPFailure, ValueError, KeyError, TypeError, OSError) as exc:
        outcome.failures.append(f"{what}: {exc}")
        return
    outcome.max_delta = max(outcome.max_delta, delta)
    if delta > TOLERANCE + SLACK:
        outcome.failures.append(f"{what}: |delta| {delta:.2e} > {TOLERANCE:.0e}")


def short(text: str) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 24 else f"{text[:20]}...({len(text)} chars)"


def compare(spec: Spec, url: str, reference: Reference) -> list[Outcome]:
    """Every request shape for the model, each over all its inputs."""

    def outcome(shape: str) -> Outcome:
        return Outcome(spec.name, spec.exporter, shape)

    outcomes: list[Outcome] = []
    if spec.pair:
        refs = [reference.pair(a, b) for a, b in PAIRS]
        by_text, by_inputs, batch = outcome("text+text_pair"), outcome("inputs [A, B]"), outcome("inputs batch")
        for (a, b), ref in zip(PAIRS, refs, strict=True):
            what = f"({short(a)!r}, {short(b)!r})"
            check(by_text, what, url, {"text": a, "text_pair": b, "return_all_probs": True}, ref)
            check(by_inputs, what, url, {"inputs": [a, b]}, ref)
        items: list[list[str]] = [[TEXTS[0]], *[list(pair) for pair in PAIRS]]
        expected = [reference.text(TEXTS[0]), *refs]
        check(batch, f"{len(items)} items, one single", url, {"inputs": items}, expected)
        outcomes += [by_text, by_inputs, batch]
    else:
        refs = [reference.text(text) for text in TEXTS]
        by_text, by_inputs, turns, batch = (outcome(shape) for shape in ("text", "inputs", "turns", "inputs batch"))
        for text, ref in zip(TEXTS, refs, strict=True):
            what = repr(short(text))
            check(by_text, what, url, {"text": text, "return_all_probs": True}, ref)
            check(by_inputs, what, url, {"inputs": text}, ref)
            dialogue = {"turns": [{"speaker": "user", "text": text}], "return_all_probs": True}
            check(turns, what, url, dialogue, ref)
        items = [[text] for text in TEXTS]
        check(batch, f"{len(items)} items", url, {"inputs": items}, refs)
        outcomes += [by_text, by_inputs, turns, batch]
    return outcomes


def compare_batch(expected: Sequence[Scores], got: Any) -> float:
    if not isinstance(got, list) or len(got) != len(expected):
        raise ValueError(f"expected a list of {len(expected)} answers, got {json.dumps(got)[:120]}")
    return max(compare_ranked(ref, answer) for ref, answer in zip(expected, got, strict=True))


# --- the run -------------------------------------------------------------------------


def run_spec(spec: Spec, root: Path) -> tuple[dict[str, Any], list[Outcome]]:
    directory = root / spec.name
    if directory.exists():
        shutil.rmtree(directory)
    started = time.perf_counter()
    info: dict[str, Any] = {"model": spec.name, "family": spec.family, "exporter": spec.exporter, "note": spec.note}
    try:
        info |= build_bundle(spec, directory)
    except Exception as exc:  # a build or export failure is a result, not a crash
        info["error"] = f"build/export: {type(exc).__name__}: {exc}"
        return info, [Outcome(spec.name, spec.exporter, "build", 1, failures=[info["error"]])]
    log(
        f"  built {spec.family} ({info['tokenizer']}, {len(info['labels'])} labels, max {info['model_max_length']}),"
        f" exported {'/'.join(info['inputs'])} -> logits, opset {info['opset']}, in {info['export_s']} s;"
        f" files: {' '.join(info['files'])}"
    )
    try:
        reference = Reference(directory)
    except Exception as exc:  # transformers cannot read the bundle back: a result too
        info["error"] = f"reference: {type(exc).__name__}: {exc}"
        return info, [Outcome(spec.name, spec.exporter, "reference", 1, failures=[info["error"]])]
    try:
        with serving(directory) as url:
            log(f"  serving at {url}; comparing")
            outcomes = compare(spec, url, reference)
    except RuntimeError as exc:
        info["error"] = f"serve: {exc}"
        outcomes = [Outcome(spec.name, spec.exporter, "serve", 1, failures=[info["error"]])]
    outcomes.append(check_command(spec, directory))
    info["seconds"] = round(time.perf_counter() - started, 1)
    return info, outcomes


def check_command(spec: Spec, directory: Path) -> Outcome:
    """`batcher check DIR` (as `python app.py check`): it must exit 0 and find its scores equal
    to transformers' pipeline (it compares them itself, the bundle holding model.safetensors)."""
    command = [sys.executable, "app.py", "check", str(directory), "--set", "model.warmup_runs=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("compare")]
    failures = []
    if done.returncode != 0:
        failures.append(f"batcher check exited {done.returncode}: {done.stderr.strip()[-300:]}")
    elif not lines or "(equal)" not in lines[0]:
        failures.append(f"batcher check did not find transformers' scores: {lines or done.stdout[-300:]}")
    found = re.search(r"largest \|Δ\| ([0-9.e+-]+)", lines[0]) if lines else None
    return Outcome(spec.name, spec.exporter, "batcher check", 1, max_delta=float(found[1]) if found else 0.0,
                   failures=failures)  # fmt: skip


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("model", "exporter", "shape", "requests", "max |delta|", "result")]
    for item in outcomes:
        delta = f"{item.max_delta:.1e}" if item.requests > len(item.failures) else "-"
        verdict = "pass" if item.passed else f"FAIL ({len(item.failures)}/{item.requests})"
        rows.append((item.model, item.exporter, item.shape, str(item.requests), delta, verdict))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.byom",
        description="Build tiny random transformers classifiers, export them to ONNX, serve each with batcher"
        " and compare its answers with transformers' pipeline (|delta| <= 1e-4, same label order).",
    )
    names = [spec.name for spec in SPECS]
    parser.add_argument("--only", action="append", choices=names, metavar="NAME", help=f"run only these: {names}")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build the bundles in DIR and keep them")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON (%(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    specs = [spec for spec in SPECS if not args.only or spec.name in args.only]
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="byom-"))
    models: list[dict[str, Any]] = []
    outcomes: list[Outcome] = []
    try:
        for number, spec in enumerate(specs, 1):
            log(f"[{number}/{len(specs)}] {spec.name}: {spec.note}")
            info, found = run_spec(spec, root)
            models.append(info)
            outcomes += found
            for item in found:
                verdict = "pass" if item.passed else f"FAIL: {item.failures[0]}"
                log(f"  {item.shape}: {item.requests} requests, max |delta| {item.max_delta:.1e}, {verdict}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    failed = [item for item in outcomes if not item.passed]
    seconds = time.perf_counter() - started
    log("\n" + table(outcomes))
    log(
        f"\n{len(outcomes) - len(failed)}/{len(outcomes)} passed in {seconds:.0f} s"
        + (f" (bundles in {root})" if args.keep else "")
    )
    report = {
        **provenance(),
        "command": "make byom  # python -m bench.byom " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tolerance": TOLERANCE,
        "texts": list(TEXTS),
        "pairs": [list(pair) for pair in PAIRS],
        "models": models,
        "results": [item.as_dict() for item in outcomes],
        "passed": not failed,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
