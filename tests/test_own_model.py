"""A team's own model, served right: bundles shaped like Hugging Face exports (tests/zoo.py,
built without torch) served with nothing but model.path, their scores compared with what
transformers' text-classification pipeline computes (zoo.reference: the tokenizer with
truncation at the right at the model's maximum length, ONNX Runtime run directly, the
pipeline's output function). `make byom` does the same against real transformers exports.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import InferenceClient
from tokenizers import Tokenizer

from batcher.check import run_check
from batcher.config import ModelSettings, load_settings
from batcher.errors import BundleError
from batcher.metrics import Metrics
from batcher.model.bundle import bundle_version, load_bundle
from batcher.model.dialogue import char_budget, dialogue_text
from batcher.model.formats import TextEncoder
from batcher.runtime import load_runtime, settings_key
from tests import zoo
from tests.conftest import MakeClient

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "play some jazz",
    "Play Some JAZZ please",
    "明天早上七点叫我起床",
    "what's the weather in Paris tomorrow? 😀",
    "wake me up at 7 " * 60,  # longer than any model here reads: cut at the right
]
PAIRS = [("how do I reset it", "hold the button for ten seconds"), ("播放音乐", "play music " * 40)]
TOLERANCE = 1e-4
SERVED = [
    "bert-plain",
    "bert-no-token-types",
    "bert-cased-vocab-only",
    "roberta-bpe",
    "xlmr-unigram",
    "multi-label",
    "one-logit",
    "final-softmax",
    "final-sigmoid-multi-label",
    "external-data",
    "int32-ids",
    "static-seq-32",
    "static-batch-1",
    "max-positions-64",
    "quantized-only",
    "onnx-subfolder",
]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("zoo")
    for spec in zoo.ZOO:
        zoo.build(spec, parent)
    return parent


def max_length(bundle: Path) -> int:
    """What the pipeline cuts at: the tokenizer's model_max_length, within what the graph takes."""
    settings = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    positions = int(config["max_position_embeddings"]) - (
        2 if config["model_type"] in ("roberta", "xlm-roberta") else 0
    )
    length = min(int(settings.get("model_max_length", 512)), positions)
    static = zoo.BY_NAME[bundle.name].static_seq_len
    return min(length, static) if static else length


def expected(bundle: Path, text: str | tuple[str, str], function: zoo.Function | None = None) -> dict[str, float]:
    spec = zoo.BY_NAME[bundle.name]
    default = "none" if spec.final != "logits" else zoo.pipeline_function(bundle)
    return zoo.reference(bundle, text, max_length=max_length(bundle), function=function or default)


def assert_close(got: dict[str, float], want: dict[str, float], tolerance: float = TOLERANCE) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    worst = max(abs(got[label] - want[label]) for label in want)
    assert worst <= tolerance, (got, want)


def ranked(want: dict[str, float]) -> list[str]:
    return sorted(want, key=lambda label: -want[label])


@pytest.mark.parametrize("name", SERVED)
async def test_a_single_text_model_is_answered_as_the_pipeline_answers(
    name: str, zoo_dir: Path, make_client: MakeClient
) -> None:
    bundle = zoo_dir / name
    client = await make_client(f'model.path="{bundle}"', "model.name=''")
    for text in TEXTS:
        want = expected(bundle, text)
        labels = list(want)
        seed = await client.post("/predict", json={"text": text, "return_all_probs": True})
        assert seed.status == 200, await seed.text()
        body = await seed.json()
        assert_close(body["probabilities"], want, 1e-4 + 5e-5)  # rounded to 4 decimals
        best = max(want, key=lambda label: want[label])
        assert body["intent_name"] == best and body["intent_id"] == labels.index(best)
        dialogue = [{"speaker": "user", "text": text}, {"speaker": "assistant", "text": "hi"}]
        turns = await client.post("/predict", json={"turns": dialogue, "return_all_probs": True})
        assert_close((await turns.json())["probabilities"], want, 1e-4 + 5e-5)  # the last user turn
        scores = await client.post("/predict", json={"inputs": text})
        answer = await scores.json()
        assert [item["label"] for item in answer] == ranked(want)
        assert_close({item["label"]: item["score"] for item in answer}, want)


@pytest.mark.parametrize("name", ["pair", "bert-plain", "roberta-bpe"])
async def test_a_pair_is_encoded_as_a_pair_without_any_setting(
    name: str, zoo_dir: Path, make_client: MakeClient
) -> None:
    bundle = zoo_dir / name
    client = await make_client(f'model.path="{bundle}"')
    for pair in PAIRS:
        want = expected(bundle, pair)
        seed = await client.post("/predict", json={"text": pair[0], "text_pair": pair[1], "return_all_probs": True})
        assert_close((await seed.json())["probabilities"], want, 1e-4 + 5e-5)
        scores = await (await client.post("/predict", json={"inputs": list(pair)})).json()
        assert_close({item["label"]: item["score"] for item in scores}, want)
    batch = await (await client.post("/predict", json={"inputs": [[TEXTS[0]], list(PAIRS[0])]})).json()
    assert len(batch) == 2
    assert_close({item["label"]: item["score"] for item in batch[0]}, expected(bundle, TEXTS[0]))
    assert_close({item["label"]: item["score"] for item in batch[1]}, expected(bundle, PAIRS[0]))


async def test_the_second_segment_gets_token_type_one(zoo_dir: Path) -> None:
    settings = load_settings(None, env={}, overrides=[f'model.path="{zoo_dir / "pair"}"'])
    encoder = TextEncoder.for_bundle(load_bundle(zoo_dir / "pair"), settings.model)
    row = encoder.prepare_text("how do I reset it", "hold the button")
    assert row.encoded is not None and 1 in row.encoded.type_ids and row.encoded.type_ids[0] == 0


async def test_a_pair_model_says_what_to_send_for_a_lone_text(zoo_dir: Path, make_client: MakeClient) -> None:
    client = await make_client(f'model.path="{zoo_dir / "pair"}"', "model.input.format=pair")
    answer = await client.post("/predict", json={"text": "how do I reset it"})
    assert answer.status == 422
    assert "text_pair" in (await answer.json())["error"]["message"]


async def test_multi_label_answers_list_every_label_over_the_threshold(zoo_dir: Path, make_client: MakeClient) -> None:
    bundle = zoo_dir / "multi-label"
    client = await make_client(f'model.path="{bundle}"', "model.output.threshold=0.3")
    for text in TEXTS:
        want = expected(bundle, text)
        body = await (await client.post("/predict", json={"text": text})).json()
        chosen = [label for label in ranked(want) if want[label] >= 0.3]
        assert [item["label"] for item in body["labels"]] == chosen
    models = await (await client.get("/models")).json()
    assert models["models"][0]["multi_label"] is True and "sigmoid" in models["models"][0]["output"]


async def test_the_output_function_can_be_set_and_asked_per_request(zoo_dir: Path, make_client: MakeClient) -> None:
    bundle = zoo_dir / "bert-plain"
    client = await make_client(f'model.path="{bundle}"', "model.output.function=sigmoid")
    body = await (await client.post("/predict", json={"text": TEXTS[0], "return_all_probs": True})).json()
    assert_close(body["probabilities"], expected(bundle, TEXTS[0], "sigmoid"), 1e-4 + 5e-5)
    for function in ("softmax", "none"):
        asked = {"inputs": TEXTS[0], "parameters": {"function_to_apply": function, "top_k": 2}}
        (answer,) = await (await client.post("/predict", json=asked)).json()
        want = expected(bundle, TEXTS[0], function)
        assert [item["label"] for item in answer] == ranked(want)[:2]
        assert_close({item["label"]: item["score"] for item in answer}, {k: want[k] for k in ranked(want)[:2]})
    raw = await (await client.post("/predict", json={"inputs": TEXTS[0], "raw_scores": True})).json()
    assert_close({item["label"]: item["score"] for item in raw}, expected(bundle, TEXTS[0], "none"))


async def test_truncation_direction_and_truncate_are_a_requests_own(zoo_dir: Path, make_client: MakeClient) -> None:
    bundle = zoo_dir / "bert-plain"
    client = await make_client(f'model.path="{bundle}"')
    long = "明天 " + "play some jazz " * 60
    left = await (await client.post("/predict", json={"inputs": long, "truncation_direction": "Left"})).json()
    right = await (await client.post("/predict", json={"inputs": long})).json()
    assert left != right
    refused = await client.post("/predict", json={"inputs": long, "truncate": False})
    assert refused.status == 413 and "truncate" in (await refused.json())["error"]["message"]
    short = await client.post("/predict", json={"inputs": "play", "truncate": False})
    assert short.status == 200


async def test_an_abstaining_model_names_its_fallback_and_its_best_guess(
    zoo_dir: Path, make_client: MakeClient
) -> None:
    bundle = zoo_dir / "bert-plain"
    client = await make_client(
        f'model.path="{bundle}"', "model.output.abstain_threshold=0.99", 'model.output.abstain_label="unknown"'
    )
    body = await (await client.post("/predict", json={"text": TEXTS[0]})).json()
    want = expected(bundle, TEXTS[0])
    assert max(want.values()) < 0.99  # a random model is never that sure
    assert body["intent_id"] == -1 and body["intent_name"] == "unknown" and body["abstained"] is True
    assert body["best_guess"]["name"] == ranked(want)[0]
    assert body["confidence"] == pytest.approx(max(want.values()), abs=1e-4)


async def test_huggingface_hubs_inference_client_gets_what_predict_answers(
    zoo_dir: Path, make_client: MakeClient
) -> None:
    bundle = zoo_dir / "bert-plain"
    client = await make_client(f'model.path="{bundle}"')
    url = f"http://{client.host}:{client.port}/predict"
    want = expected(bundle, TEXTS[2])
    for top_k in (None, 2):
        hub = InferenceClient(model=url)
        answer = await asyncio.to_thread(hub.text_classification, TEXTS[2], top_k=top_k)
        got = {item.label: item.score for item in answer}
        assert list(got) == ranked(want)[: top_k or len(want)]
        assert_close(got, {label: want[label] for label in got})
        plain = await (await client.post("/predict", json={"inputs": TEXTS[2]})).json()
        assert [(item["label"], item["score"]) for item in plain][: len(got)] == list(got.items())


@pytest.mark.parametrize(
    ("name", "setting", "match"),
    [
        ("two-outputs", None, r"several outputs \(embedding, scores\).*model\.output\.name"),
        ("vocab-too-large", None, r"vocabulary is larger than the model's embedding table"),
        ("fp16-only", "model.file=model.onnx", r"model\.onnx is missing"),
    ],
)
async def test_a_bundle_that_cannot_work_is_refused_in_one_line(
    name: str, setting: str | None, match: str, zoo_dir: Path
) -> None:
    overrides = [f'model.path="{zoo_dir / name}"', "model.warmup_runs=0", *([setting] if setting else [])]
    settings = load_settings(None, env={}, overrides=overrides)
    with pytest.raises(BundleError, match=match) as error:
        await load_runtime(settings.served[0], settings, Metrics(process=False))
    assert "\n" not in str(error.value)


async def test_two_outputs_serve_once_the_scores_are_named(zoo_dir: Path, make_client: MakeClient) -> None:
    bundle = zoo_dir / "two-outputs"
    client = await make_client(f'model.path="{bundle}"', 'model.output.name="scores"')
    body = await (await client.post("/predict", json={"inputs": TEXTS[0]})).json()
    want = zoo.reference(bundle, TEXTS[0], max_length=128, function="softmax")
    assert_close({item["label"]: item["score"] for item in body}, want)


async def test_an_fp16_only_bundle_is_served_by_auto(zoo_dir: Path, make_client: MakeClient) -> None:
    bundle = zoo_dir / "fp16-only"
    client = await make_client(f'model.path="{bundle}"')
    models = await (await client.get("/models")).json()
    assert models["models"][0]["file"] == "model.fp16.onnx"
    body = await (await client.post("/predict", json={"inputs": TEXTS[0]})).json()
    want = zoo.reference(bundle, TEXTS[0], max_length=128, function="softmax", file="model.fp16.onnx")
    assert_close({item["label"]: item["score"] for item in body}, want, 2e-3)  # fp16 output


async def test_a_bundle_without_a_name_is_named_after_its_folder(zoo_dir: Path, make_client: MakeClient) -> None:
    client = await make_client(f'model.path="{zoo_dir / "roberta-bpe"}"', "model.name=''")
    models = await (await client.get("/models")).json()
    assert models["default"] == "roberta-bpe" and models["models"][0]["name"] == "roberta-bpe"
    assert (await client.post("/models/roberta-bpe/predict", json={"text": "hi"})).status == 200
    assert (await client.get("/v2/models/roberta-bpe")).status == 200
    assert 'model="roberta-bpe"' in await (await client.get("/metrics")).text()


def test_the_version_follows_every_file_and_setting_that_decides_an_answer(zoo_dir: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(zoo_dir / "external-data", tmp_path / "external-data"))
    key = settings_key(ModelSettings())
    first = bundle_version(bundle, "model.onnx", key)
    assert bundle_version(bundle, "model.onnx", key) == first  # stable
    config = bundle / "tokenizer_config.json"
    config.write_text(config.read_text(encoding="utf-8").replace("}", ', "do_lower_case": false}', 1), "utf-8")
    second = bundle_version(bundle, "model.onnx", key)
    assert second != first
    data = bundle / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    third = bundle_version(bundle, "model.onnx", key)
    assert third not in (first, second)
    changed = settings_key(load_settings(None, env={}, overrides=["model.output.function=sigmoid"]).model)
    assert bundle_version(bundle, "model.onnx", changed) not in (first, second, third)


def test_the_bundled_model_reads_exactly_what_it_read_before(tmp_path: Path) -> None:
    """Every test-split dialogue gets the ids the engine gave before formats were declared:
    the dialogue text of batcher.model.dialogue's defaults, the tokenizer truncating at the
    left at 128 tokens (written out here with the tokenizers library alone)."""
    bundled = ROOT / "models" / "intent-zh"
    encoder = TextEncoder.from_bundle(bundled)
    assert encoder.format.kind == "dialogue" and encoder.max_seq_len == 128
    before = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    before.no_padding()
    before.enable_truncation(max_length=128, direction="left")
    lines = (ROOT / "data" / "intents" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) > 500
    for line in lines:
        turns = [(turn["speaker"], turn["text"]) for turn in json.loads(line)["turns"]]
        old = before.encode(dialogue_text(turns, char_budget(128)))
        new = encoder.prepare(turns).encoded
        assert new is not None and new.ids == old.ids and new.type_ids == old.type_ids


async def test_the_log_says_how_each_model_is_fed_and_scored(
    zoo_dir: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="batcher.runtime")
    await make_client(f'model.path="{zoo_dir / "multi-label"}"')
    lines = [record.getMessage() for record in caplog.records]
    assert any("reads text: one text (a pair when sent one), as given" in line for line in lines), lines
    assert any("scores with sigmoid (problem_type = multi_label_classification)" in line for line in lines), lines


def test_a_cased_vocab_keeps_capitals(zoo_dir: Path) -> None:
    encoder = TextEncoder.from_bundle(zoo_dir / "bert-cased-vocab-only")
    upper, lower = encoder.prepare_text("Play").encoded, encoder.prepare_text("play").encoded
    assert upper is not None and lower is not None and upper.ids != lower.ids


@pytest.mark.parametrize("name", ["bert-plain", "pair", "multi-label", "static-seq-32", "max-positions-64"])
def test_check_prints_what_it_detected_and_exits_0_where_the_model_serves(name: str, zoo_dir: Path) -> None:
    settings = load_settings(None, env={}, overrides=[f'model.path="{zoo_dir / name}"', "model.warmup_runs=0"])
    out, err = io.StringIO(), io.StringIO()
    assert run_check(settings, out, err=err) == 0, err.getvalue()
    report = out.getvalue()
    for fact in ("graph", "inputs", "outputs", "labels", "input", "output", "text", "tokens", "ids", "answer"):
        assert re.search(rf"^{fact} +\S", report, re.MULTILINE), (fact, report)
    assert "from config.json id2label" in report and "cut at the right" in report
    assert "compare   skipped: no PyTorch weights" in report  # make byom runs the comparison itself


@pytest.mark.parametrize(
    ("name", "message"),
    [("two-outputs", "set model.output.name"), ("vocab-too-large", "larger than the model's embedding table")],
)
def test_check_exits_2_with_start_ups_one_line_where_it_cannot(name: str, message: str, zoo_dir: Path) -> None:
    settings = load_settings(None, env={}, overrides=[f'model.path="{zoo_dir / name}"', "model.warmup_runs=0"])
    out, err = io.StringIO(), io.StringIO()
    assert run_check(settings, out, err=err) == 2
    assert message in err.getvalue() and err.getvalue().count("\n") == 1


def test_check_on_the_bundled_model_shows_its_dialogue_template() -> None:
    settings = load_settings(ROOT / "config.toml", env={}, overrides=["model.warmup_runs=0"])
    out = io.StringIO()
    assert run_check(settings, out) == 0
    report = out.getvalue()
    assert "dialogue (all turns, markers '用户：'/'助手：', separator '[SEP]', cleaned)" in report
    assert "text      '用户：你好'\ntokens    7: [CLS] 用 户 ： 你 好 [SEP]\n" in report  # its batcher.json sample


@pytest.mark.parametrize(("name", "message"), [("vocab-too-large", "embedding table"), ("two-outputs", "output.name")])
def test_serve_refuses_a_bundle_that_cannot_work_with_exit_2_and_one_line(
    name: str, message: str, zoo_dir: Path
) -> None:
    command = [sys.executable, "app.py", "serve", str(zoo_dir / name), "--port", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert len([line for line in done.stderr.splitlines() if line.startswith("batcher")]) == 1
