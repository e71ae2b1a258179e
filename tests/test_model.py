from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from batcher.config import ModelSettings
from batcher.errors import BundleError, StartupError
from batcher.model.bundle import choose_graph, load_bundle
from batcher.model.session import CPU, OnnxModel
from batcher.runtime import warm_up
from tests.tiny_model import LABELS, build_bundle, build_graph


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_loads_labels_and_hash(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.labels == LABELS
    assert len(bundle.sha256) == 64


def test_runs_on_cpu_without_noise(tiny_bundle: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = OnnxModel(load_bundle(tiny_bundle), ModelSettings(device="auto", intra_op_threads=1))
    assert model.provider == CPU  # no GPU on the test machines; auto must not claim CUDA
    ids = np.array([[2, 10, 11, 3]])
    logits = model.run(ids, np.ones_like(ids), np.zeros_like(ids))
    assert logits.shape == (1, len(LABELS))
    assert "error" not in capfd.readouterr().err.lower()


def test_device_cuda_fails_loudly_without_a_gpu(tiny_bundle: Path) -> None:
    with pytest.raises(StartupError, match="cannot run on CUDA"):
        OnnxModel(load_bundle(tiny_bundle), ModelSettings(device="cuda"))


def test_padding_does_not_change_logits(tiny_bundle: Path) -> None:
    model = OnnxModel(load_bundle(tiny_bundle), ModelSettings(intra_op_threads=1))
    ids = np.array([[2, 10, 11, 12, 3]])
    alone = model.run(ids, np.ones_like(ids), np.zeros_like(ids))
    padded = np.array([[2, 10, 11, 12, 3, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_allclose(model.run(padded, mask, np.zeros_like(padded)), alone, atol=1e-5)


@pytest.mark.parametrize(("token_types", "id_type"), [(False, onnx.TensorProto.INT64), (True, onnx.TensorProto.INT32)])
def test_input_names_and_dtypes_come_from_the_graph(tmp_path: Path, token_types: bool, id_type: int) -> None:
    bundle_dir = build_bundle(tmp_path / "b")
    vocab = len(json.loads((bundle_dir / "tokenizer.json").read_text())["model"]["vocab"])
    graph = build_graph(vocab, len(LABELS), token_types=token_types, id_type=id_type)
    onnx.save(graph, str(bundle_dir / "model.onnx"))
    model = OnnxModel(load_bundle(bundle_dir), ModelSettings())
    ids = np.array([[2, 10, 11, 3]])
    assert model.run(ids, np.ones_like(ids), np.zeros_like(ids)).shape == (1, len(LABELS))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda d: (d / "labels.json").unlink(), "neither labels.json nor config.json"),
        (lambda d: (d / "labels.json").write_text("[]"), "expected a non-empty list"),
        (lambda d: (d / "labels.json").write_text('["a", "a"]'), "unique"),
        (lambda d: (d / "labels.json").write_text("{oops"), "cannot read JSON"),
        (lambda d: (d / "model.onnx").write_bytes(b"not onnx"), "ONNX Runtime cannot load it"),
        (lambda d: (d / "labels.json").write_text('["a", "b", "c"]'), "has 3 labels"),
    ],
)
def test_bad_bundles_name_the_file_and_problem(tmp_path: Path, tiny_bundle: Path, mutate: object, message: str) -> None:
    bundle_dir = copy_bundle(tiny_bundle, tmp_path / "b")
    mutate(bundle_dir)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        OnnxModel(load_bundle(bundle_dir), ModelSettings())


def test_config_json_id2label(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle_dir = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle_dir / "labels.json").unlink()
    id2label = {str(i): name for i, name in enumerate(LABELS)}
    (bundle_dir / "config.json").write_text(json.dumps({"id2label": id2label}, ensure_ascii=False))
    assert load_bundle(bundle_dir).labels == LABELS
    (bundle_dir / "config.json").write_text(json.dumps({"id2label": {"0": "a", "2": "b"}}))
    with pytest.raises(BundleError, match="without gaps"):
        load_bundle(bundle_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nope")


def test_warm_up_runs_every_shape(tiny_bundle: Path) -> None:
    seen: list[tuple[int, ...]] = []

    class Recorder:
        provider = "fake"

        def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
            seen.append(input_ids.shape)
            return np.zeros((len(input_ids), 4), dtype=np.float32)

    warm_up(Recorder(), pad_id=0, batch_sizes=[1, 4], lengths=[8, 16], runs=2)
    assert seen == [(1, 8), (1, 16), (4, 8), (4, 16)] * 2


def test_graph_file_is_configurable(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle_dir = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle_dir / "model.onnx").rename(bundle_dir / "other.onnx")
    assert load_bundle(bundle_dir, "other.onnx").model_path.name == "other.onnx"
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("files", "on_gpu", "chosen"),
    [
        (["model.onnx", "model.int8.onnx"], False, "model.int8.onnx"),
        (["model.onnx"], False, "model.onnx"),
        (["model.onnx", "model.int8.onnx"], True, "model.onnx"),
        (["model.onnx", "model.int8.onnx", "model.fp16.onnx"], True, "model.fp16.onnx"),
    ],
)
def test_auto_picks_the_graph_for_the_device(tmp_path: Path, files: list[str], on_gpu: bool, chosen: str) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"graph")
    assert choose_graph(tmp_path, "auto", on_gpu=on_gpu) == chosen
    assert choose_graph(tmp_path, "model.onnx", on_gpu=on_gpu) == "model.onnx"  # a name always wins


def test_auto_without_a_graph_it_knows_names_the_graphs_it_found(tmp_path: Path) -> None:
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "classifier.onnx").write_bytes(b"graph")
    with pytest.raises(BundleError, match=r"found no graph .* it has exported/classifier\.onnx: set model\.file"):
        choose_graph(tmp_path, "auto", on_gpu=True)


def test_auto_takes_an_int8_graph_on_cuda_when_it_is_the_only_one(tmp_path: Path) -> None:
    (tmp_path / "model.int8.onnx").write_bytes(b"graph")
    assert choose_graph(tmp_path, "auto", on_gpu=True) == "model.int8.onnx"
