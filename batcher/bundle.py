"""A model bundle on disk: the graph file, the labels and the content hash that versions it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.errors import BundleError


@dataclass(frozen=True)
class ModelBundle:
    """A checked model directory."""

    directory: Path
    model_path: Path
    labels: list[str]
    sha256: str
    """The graph file's SHA-256."""
    version: str
    """The bundle's content hash (graph, tokenizer, labels), shortened: what a reload compares."""

    @property
    def name(self) -> str:
        return self.directory.resolve().name


# model.file = "auto": the graph for the device, first that the bundle has. Dynamic int8
# quantisation runs on the CPU only (and ran ~1.4x the sequences/s of fp32 here at the same
# accuracy, models/intent-zh/README.md); on CUDA, fp16 where the bundle has it.
AUTO_GRAPHS = {"cpu": ("model.int8.onnx", "model.onnx"), "cuda": ("model.fp16.onnx", "model.onnx")}


def choose_graph(directory: Path, file: str, *, on_gpu: bool) -> str:
    """The graph file to serve: `file` itself, or for "auto" the device's best the bundle has."""
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} is not a directory")
    if file != "auto":
        return file
    candidates = AUTO_GRAPHS["cuda" if on_gpu else "cpu"]
    present = [name for name in candidates if (directory / name).is_file()]
    if not present:
        raise BundleError(f"{directory}: model.file = 'auto' found none of {', '.join(candidates)}")
    return present[0]


def load_bundle(directory: Path, file: str = "model.onnx") -> ModelBundle:
    """Check a bundle directory and read its labels; errors name the file and the problem."""
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} is not a directory")
    model_path = directory / file
    if not model_path.is_file():
        raise BundleError(f"{model_path} is missing")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return ModelBundle(directory, model_path, _read_labels(directory), digest, bundle_version(directory, file))


VERSIONED = ("tokenizer.json", "vocab.txt", "labels.json", "config.json")


def bundle_version(directory: Path, file: str) -> str:
    """The content hash of what serving reads from a bundle: the graph, the tokenizer and the
    labels. Twelve hex digits; the same files give the same version on every machine."""
    digest = hashlib.sha256()
    for name in (file, *VERSIONED):
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def _read_labels(directory: Path) -> list[str]:
    labels_path = directory / "labels.json"
    config_path = directory / "config.json"
    if labels_path.is_file():
        path, data = labels_path, _read_json(labels_path)
        labels = data.get("labels", data.get("id2label")) if isinstance(data, dict) else data
    elif config_path.is_file():
        path, data = config_path, _read_json(config_path)
        labels = data.get("id2label") if isinstance(data, dict) else None
    else:
        raise BundleError(f"{directory}: neither labels.json nor config.json (with id2label) is present")
    if isinstance(labels, dict):
        try:
            by_id = {int(key): value for key, value in labels.items()}
        except ValueError:
            raise BundleError(f"{path}: id2label keys must be integer ids") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise BundleError(f"{path}: id2label ids must be 0..{len(by_id) - 1} without gaps")
        labels = [by_id[index] for index in range(len(by_id))]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(f"{path}: expected a non-empty list of label names (or an id2label map)")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{path}: label names must be unique")
    return labels


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read JSON: {exc}") from None
