"""The model bundle and the ONNX Runtime session behind a small protocol.

The batcher depends only on `Model.run(input_ids, attention_mask, token_type_ids) -> logits`,
so tests can swap in a deliberately slow or failing model where the point is timing;
everywhere else a real `OnnxModel` runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from batcher.config import ModelSettings
from batcher.errors import BundleError, StartupError

log = logging.getLogger(__name__)

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class Model(Protocol):
    """What the batcher needs from a model: one call per padded batch."""

    provider: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Logits of shape (rows, labels) for int64 inputs of shape (rows, longest)."""
        ...


@dataclass(frozen=True)
class ModelBundle:
    """A checked model directory."""

    directory: Path
    model_path: Path
    labels: list[str]
    sha256: str

    @property
    def name(self) -> str:
        return self.directory.resolve().name


def load_bundle(directory: Path, file: str = "model.onnx") -> ModelBundle:
    """Check a bundle directory and read its labels; errors name the file and the problem."""
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} is not a directory")
    model_path = directory / file
    if not model_path.is_file():
        raise BundleError(f"{model_path} is missing")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return ModelBundle(directory, model_path, _read_labels(directory), digest)


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


class OnnxModel:
    """One ONNX Runtime session; `run` is safe to call from several threads at once."""

    def __init__(self, bundle: ModelBundle, settings: ModelSettings) -> None:
        self.session, self.provider = _create_session(bundle.model_path, settings)
        inputs = {node.name: node for node in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise BundleError(f"{bundle.model_path}: the graph has no input_ids input (has {', '.join(inputs)})")
        unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise BundleError(f"{bundle.model_path}: unsupported graph inputs {', '.join(sorted(unknown))}")
        self._dtypes: dict[str, Any] = {}
        for name, node in inputs.items():
            if node.type not in _DTYPES:
                raise BundleError(f"{bundle.model_path}: input {name} has type {node.type}; expected int64 or int32")
            self._dtypes[name] = _DTYPES[node.type]
        outputs = [node.name for node in self.session.get_outputs()]
        self._output = "logits" if "logits" in outputs else outputs[0]
        width = self.run(*(np.ones((1, 4), dtype=np.int64),) * 2, np.zeros((1, 4), dtype=np.int64)).shape
        if len(width) != 2 or width[1] != len(bundle.labels):
            raise BundleError(
                f"{bundle.model_path}: output {self._output} has shape {width} for one row, "
                f"but the bundle has {len(bundle.labels)} labels"
            )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {name: given[name].astype(dtype, copy=False) for name, dtype in self._dtypes.items()}
        logits: np.ndarray = self.session.run([self._output], feed)[0]
        return logits


def _create_session(path: Path, settings: ModelSettings) -> tuple[ort.InferenceSession, str]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION[settings.graph_optimization]
    spinning = "1" if settings.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    options.log_severity_level = 3
    want_cuda = settings.device == "cuda" or (settings.device == "auto" and CUDA in ort.get_available_providers())
    if not want_cuda:
        return _session(path, options, [CPU]), CPU
    # onnxruntime-gpu lists CUDA even where its libraries are missing, then logs errors
    # and falls back; keep those quiet and judge by the providers the session really has.
    ort.set_default_logger_severity(4)
    try:
        session = _session(path, options, [CUDA, CPU])
    finally:
        ort.set_default_logger_severity(2)
    provider = session.get_providers()[0]
    if provider != CUDA:
        if settings.device == "cuda":
            raise StartupError("model.device = 'cuda' but ONNX Runtime cannot run on CUDA here; use 'auto' or 'cpu'")
        return _session(path, options, [CPU]), CPU
    return session, CUDA


def _session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise BundleError(f"{path}: ONNX Runtime cannot load it: {exc}") from None


def warm_up(model: Model, *, pad_id: int, batch_sizes: Sequence[int], lengths: Sequence[int], runs: int) -> None:
    """Run every batch size x length so kernels and memory arenas are ready before traffic."""
    for _ in range(runs):
        for rows in batch_sizes:
            for length in lengths:
                ids = np.full((rows, length), pad_id + 1, dtype=np.int64)
                model.run(ids, np.ones_like(ids), np.zeros_like(ids))
