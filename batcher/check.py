"""`batcher check`: load a model bundle as `batcher serve` would and say, before anything is
served, how the model will be fed and scored; 0 when it serves, 2 with the same one-line
message start-up gives when it cannot.

It prints what was detected (the graph and why, its inputs and outputs with their shapes,
the labels and where they came from, the input format, the output function, the maximum
length and why), shows how one sample request becomes the model's text and token ids,
runs that request through the same path as `/predict` (`handlers.start_prediction`), and,
where `transformers` is importable and the bundle holds the PyTorch weights
`save_pretrained` wrote, compares batcher's scores with `transformers`' text-classification
pipeline on a few texts.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson
import uvloop

from batcher.config import Settings
from batcher.errors import HTTPError, StartupError
from batcher.handlers import finish_prediction, start_prediction
from batcher.metrics import Metrics
from batcher.model.session import OnnxModel
from batcher.runtime import SAMPLE_TEXT, Models, Runtime, load_runtime

DRAIN_TIMEOUT_S = 5.0
COMPARED = ("hello", "Play some music, please!", "明天早上七点叫我起床", "what is the weather like in Paris tomorrow")
"""Texts the comparison with transformers' pipeline scores (a pair of the first two for a pair model)."""
TOLERANCE = 1e-4
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class CheckFailed(StartupError):
    """The bundle serves, but not as transformers answers."""


def run_check(settings: Settings, out: TextIO, *, text: str | None = None, err: TextIO = sys.stderr) -> int:
    """Check the default model of `settings`, reporting to `out`; the exit code. `text`: the
    sample request's (default: the bundle's batcher.json `sample`, else SAMPLE_TEXT)."""
    try:
        uvloop.run(_check(settings, out, text))
    except (StartupError, HTTPError) as exc:
        print(f"batcher check: {exc}", file=err)
        return 2
    except Exception as exc:  # an ONNX Runtime or tokenizer failure: one line, as start-up gives
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"batcher check: {type(exc).__name__}: {first_line}", file=err)
        return 2
    print("ok: the bundle loads, warms up and answers", file=out)
    return 0


async def _check(settings: Settings, out: TextIO, text: str | None) -> None:
    metrics = Metrics(process=False)
    models = Models(settings, metrics)
    spec = settings.served[0]
    try:
        runtime = await load_runtime(spec, settings, metrics)
        models.add(runtime)
        describe(runtime, out)
        sample = runtime.bundle.declared.get("sample")
        body = sample_body(runtime, text or (sample if isinstance(sample, str) and sample.strip() else SAMPLE_TEXT))
        show_input(runtime, body, out)
        started = time.perf_counter()
        _, request, _, pending = start_prediction(models, spec.name, body)
        answer, _ = finish_prediction(settings.log, "check", runtime, request, await pending, started)
        print(f"request   POST /predict {orjson.dumps(body).decode()}", file=out)
        print(f"answer    {orjson.dumps(answer).decode()}", file=out)
        await compare(runtime, models, settings, out)
    finally:
        await models.drain(DRAIN_TIMEOUT_S)


def describe(runtime: Runtime, out: TextIO) -> None:
    """What was loaded and detected: one `name  value` line a fact."""
    bundle, encoder, head = runtime.bundle, runtime.encoder, runtime.head
    labels = runtime.labels
    shown = ", ".join(labels[:12]) + (f", … ({len(labels) - 12} more)" if len(labels) > 12 else "")
    chosen = "model.file" if runtime.spec.model.file != "auto" else f"model.file = auto on {runtime.provider}"
    facts = {
        "model": runtime.name,
        "bundle": str(bundle.directory),
        "graph": f"{bundle.model_path.relative_to(bundle.directory).as_posix()} ({chosen}; "
        f"sha256 {bundle.sha256[:12]})",
        "provider": runtime.provider,
        "version": runtime.version,
        "labels": f"{len(labels)} from {bundle.labels_from}: {shown}",
        "input": encoder.format.describe(),
        "tokenizer": f"{'tokenizer.json' if (bundle.directory / 'tokenizer.json').is_file() else 'vocab.txt'}, "
        f"{encoder.vocab_size} tokens, pad id {encoder.pad_id}, "
        f"{'exact shortcut' if encoder.shortcut else 'no shortcut (the tokenizer does it all)'}",
        "output": head.describe(),
    }
    session = runtime.batcher.model
    if isinstance(session, OnnxModel):
        facts["inputs"] = ", ".join(f"{name} {kind} {shape}" for name, (kind, shape) in session.inputs.items())
        facts["outputs"] = ", ".join(
            f"{name} {kind} {shape}{' (read)' if name == session.output else ''}"
            for name, (kind, shape) in session.outputs.items()
        )
    for name, value in facts.items():
        print(f"{name:<9} {value}", file=out)


def sample_body(runtime: Runtime, text: str) -> dict[str, Any]:
    """A /predict body in the shape the model reads: turns for a dialogue, a pair for a pair model."""
    kind = runtime.encoder.format.kind
    if kind == "dialogue":
        return {"turns": [{"speaker": "user", "text": text}], "return_all_probs": True}
    if kind == "pair":
        return {"text": text, "text_pair": text, "return_all_probs": True}
    return {"text": text, "return_all_probs": True}


def show_input(runtime: Runtime, body: dict[str, Any], out: TextIO) -> None:
    """How the sample becomes the model's text and ids."""
    encoder = runtime.encoder
    if "turns" in body:
        row = encoder.prepare([(turn["speaker"], turn["text"]) for turn in body["turns"]])
    else:
        row = encoder.prepare_text(body["text"], body.get("text_pair"))
    assert row.encoded is not None
    text = row.text if row.pair is None else f"{row.text!r} + {row.pair!r}"
    tokens = [encoder.tokens.token(index) for index in row.encoded.ids]
    print(f"text      {text if row.pair else repr(text)}", file=out)
    print(f"tokens    {len(tokens)}: {' '.join(tokens)}", file=out)
    print(f"ids       {row.encoded.ids}", file=out)
    if any(row.encoded.type_ids):
        print(f"types     {row.encoded.type_ids}", file=out)


async def compare(runtime: Runtime, models: Models, settings: Settings, out: TextIO) -> None:
    """batcher's scores against transformers' pipeline, where both are at hand; CheckFailed
    past TOLERANCE."""
    directory = runtime.bundle.directory
    kind = runtime.encoder.format.kind
    if kind == "dialogue":
        print("compare   skipped: the model reads a dialogue template, which the pipeline does not build", file=out)
        return
    if not any((directory / name).is_file() for name in WEIGHTS):
        print("compare   skipped: no PyTorch weights (model.safetensors) in the bundle", file=out)
        return
    try:
        from transformers import pipeline  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print("compare   skipped: transformers is not installed here", file=out)
        return
    classify = pipeline("text-classification", model=str(directory), tokenizer=str(directory), top_k=None)
    inputs: list[Any] = (
        [{"text": COMPARED[0], "text_pair": COMPARED[1]}, {"text": COMPARED[2], "text_pair": COMPARED[3]}]
        if kind == "pair"
        else list(COMPARED)
    )
    worst = 0.0
    for given in inputs:
        expected = classify(given, truncation=True)
        if expected and isinstance(expected[0], list):  # transformers 5 answers one input as [[...]]
            expected = expected[0]
        want = {item["label"]: float(item["score"]) for item in expected}
        body = {"inputs": [given["text"], given["text_pair"]] if isinstance(given, dict) else given}
        _, request, _, pending = start_prediction(models, runtime.name, body)
        answer, _ = finish_prediction(settings.log, "check", runtime, request, await pending, 0.0)
        got = {item["label"]: float(item["score"]) for item in answer}
        if set(got) != set(want):
            raise CheckFailed(f"labels differ from transformers': {sorted(got)} vs {sorted(want)}")
        worst = max(worst, *(abs(got[label] - want[label]) for label in want))
    verdict = "equal" if worst <= TOLERANCE else "DIFFERENT"
    print(f"compare   transformers' pipeline on {len(inputs)} inputs: largest |Δ| {worst:.1e} ({verdict})", file=out)
    if worst > TOLERANCE:
        raise CheckFailed(f"scores differ from transformers' pipeline by up to {worst:.2g} (more than {TOLERANCE:g})")
