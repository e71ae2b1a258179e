"""Self-tests of tests/zoo.py: every bundle builds quickly and deterministically, the good
ones run in ONNX Runtime, and the broken ones fail the way the zoo says they do."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.zoo import BY_NAME, ZOO, Spec, build, build_tokenizer, encode, graph_file, pipeline_function, reference

TEXT = "Play some music by Jay Chou, 播放周杰伦的歌"
LONG = " ".join(["play some music"] * 60)
BROKEN = {"max-positions-64", "vocab-too-large"}


@pytest.mark.parametrize("spec", ZOO, ids=lambda spec: spec.name)
def test_builds_a_runnable_bundle(spec: Spec, tmp_path: Path) -> None:
    started = time.perf_counter()
    bundle = build(spec, tmp_path)
    assert time.perf_counter() - started < 0.5
    assert graph_file(bundle) == bundle / spec.file
    onnx.checker.check_model(str(bundle / spec.file))
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    assert list(config["id2label"].values()) == spec.label_names
    assert config["label2id"] == {label: i for i, label in enumerate(spec.label_names)}
    assert config.get("problem_type") == spec.problem_type
    assert (bundle / "tokenizer.json").exists() == (spec.tokenizer != "wordpiece_cased_vocab")
    assert (bundle / "vocab.txt").exists() == spec.tokenizer.startswith("wordpiece")
    assert (bundle / f"{spec.file}.data").exists() == spec.external_data
    if spec.name in BROKEN:
        return
    scores = reference(bundle, TEXT, max_length=32, function="softmax")
    assert list(scores) == spec.label_names
    assert sum(scores.values()) == pytest.approx(1.0)


def test_builds_are_deterministic(tmp_path: Path) -> None:
    for spec in ZOO:
        first, second = build(spec, tmp_path / "a"), build(spec, tmp_path / "b")
        files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
        assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
        for name in files:
            assert (first / name).read_bytes() == (second / name).read_bytes(), (spec.name, name)


def test_tokenizers_follow_the_transformers_templates() -> None:
    bert = build_tokenizer("wordpiece").encode("Play music", "天气")
    assert bert.tokens == ["[CLS]", "play", "music", "[SEP]", "天", "气", "[SEP]"]
    assert bert.type_ids == [0, 0, 0, 0, 1, 1, 1]
    for kind in ("bpe", "unigram"):
        tokenizer = build_tokenizer(kind)
        assert [tokenizer.token_to_id(token) for token in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
        pair = tokenizer.encode("hello", "world")
        assert pair.ids[0] == 0 and pair.ids[-1] == 2 and pair.tokens.count("</s>") == 3
        assert set(pair.type_ids) == {0}
    cased = build_tokenizer("wordpiece_cased_vocab").get_vocab()
    assert "Play" in cased and "play" in cased
    assert 300 <= build_tokenizer("wordpiece").get_vocab_size() <= 600


def test_vocab_only_bundle_keeps_case(tmp_path: Path) -> None:
    bundle = build(BY_NAME["bert-cased-vocab-only"], tmp_path)
    assert json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))["do_lower_case"] is False
    assert encode(bundle, "Play play", max_length=8).tokens == ["[CLS]", "Play", "play", "[SEP]"]


def test_pair_and_truncation(tmp_path: Path) -> None:
    bundle = build(BY_NAME["pair"], tmp_path)
    encoding = encode(bundle, (LONG, "天气"), max_length=16)
    assert len(encoding.ids) == 16 and encoding.type_ids[-3:] == [1, 1, 1]
    assert set(reference(bundle, ("weather today", "今天天气"), max_length=16, function="none")) == {
        "different",
        "same",
    }


def test_pipeline_function_follows_the_config(tmp_path: Path) -> None:
    assert pipeline_function(build(BY_NAME["bert-plain"], tmp_path)) == "softmax"
    assert pipeline_function(build(BY_NAME["multi-label"], tmp_path)) == "sigmoid"
    assert pipeline_function(build(BY_NAME["one-logit"], tmp_path)) == "sigmoid"
    assert pipeline_function(build(Spec("regression", num_labels=1, problem_type="regression"), tmp_path)) == "none"


def test_variants_share_the_plain_weights(tmp_path: Path) -> None:
    """Same seed, same weights: padding to a static length, int32 ids, a second output and
    another file layout change nothing; fp16 and int8 change a little."""
    plain = reference(build(BY_NAME["bert-plain"], tmp_path), TEXT, max_length=32, function="none")
    for name in ("static-seq-32", "static-batch-1", "int32-ids", "two-outputs", "external-data", "onnx-subfolder"):
        scores = reference(build(BY_NAME[name], tmp_path), TEXT, max_length=32, function="none")
        assert scores == pytest.approx(plain, abs=1e-5), name
    for name in ("fp16-only", "quantized-only"):
        scores = reference(build(BY_NAME[name], tmp_path), TEXT, max_length=32, function="none")
        assert scores == pytest.approx(plain, abs=0.1), name


def _feed(session: ort.InferenceSession, batch: int, length: int) -> dict[str, np.ndarray]:
    return {arg.name: np.ones((batch, length), dtype=np.int64) for arg in session.get_inputs()}


def _erase_dims(path: Path) -> bytes:
    model = onnx.load(str(path))
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            dim.dim_param = "free"
    return model.SerializeToString()  # type: ignore[no-any-return]


def test_static_shapes_are_baked_in(tmp_path: Path) -> None:
    graph = build(BY_NAME["static-seq-32"], tmp_path) / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch_size", 32]
    session.run(None, _feed(session, 3, 32))
    with pytest.raises(Exception, match="Got invalid dimensions for input"):
        session.run(None, _feed(session, 3, 16))
    loose = ort.InferenceSession(_erase_dims(graph), providers=["CPUExecutionProvider"])
    for length in (1, 16, 33):  # a Reshape holds the constant 32
        with pytest.raises(Exception, match="cannot be reshaped"):
            loose.run(None, _feed(loose, 3, length))

    graph = build(BY_NAME["static-batch-1"], tmp_path) / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, "sequence_length"]
    with pytest.raises(Exception, match="Got invalid dimensions for input"):
        session.run(None, _feed(session, 2, 8))
    loose = ort.InferenceSession(_erase_dims(graph), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="cannot be reshaped"):
        loose.run(None, _feed(loose, 2, 8))


def test_too_many_positions_fail(tmp_path: Path) -> None:
    bundle = build(BY_NAME["max-positions-64"], tmp_path)
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    assert config["max_position_embeddings"] == 64
    assert json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))["model_max_length"] == 512
    reference(bundle, LONG, max_length=64, function="softmax")
    # ORT's default (ENABLE_ALL) optimisation turns Gather(table, Range) into a clamping
    # Slice, so the failure is the Add's broadcast (as in a real BERT export, whose
    # position_ids buffer is sliced); with basic optimisation it is the Gather's bounds check.
    with pytest.raises(Exception, match="64 by 128"):
        reference(bundle, LONG, max_length=128, function="softmax")
    roberta = build(BY_NAME["roberta-bpe"], tmp_path)  # positions start at 2: 512 tokens fit in 514 rows
    reference(roberta, LONG * 3, max_length=512, function="softmax")
    with pytest.raises(Exception, match="out of data bounds"):
        reference(roberta, LONG * 3, max_length=513, function="softmax")


def test_vocab_too_large_fails(tmp_path: Path) -> None:
    bundle = build(BY_NAME["vocab-too-large"], tmp_path)
    assert json.loads((bundle / "config.json").read_text(encoding="utf-8"))["vocab_size"] == 100
    reference(bundle, "a b c", max_length=16, function="softmax")  # low ids only
    with pytest.raises(Exception, match="out of data bounds"):
        reference(bundle, TEXT, max_length=32, function="softmax")


def test_fp16_graph_takes_int64_and_returns_float16(tmp_path: Path) -> None:
    graph = build(BY_NAME["fp16-only"], tmp_path) / "model.fp16.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [arg.type for arg in session.get_inputs()] == ["tensor(int64)"] * 3
    (logits,) = session.run(None, _feed(session, 2, 8))
    assert logits.dtype == np.float16 and logits.shape == (2, 4)


def test_two_outputs_are_embedding_then_scores(tmp_path: Path) -> None:
    session = ort.InferenceSession(
        str(build(BY_NAME["two-outputs"], tmp_path) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    embedding, scores = session.run(None, _feed(session, 2, 8))
    assert [out.name for out in session.get_outputs()] == ["embedding", "scores"]
    assert embedding.shape == (2, 16) and scores.shape == (2, 4)
