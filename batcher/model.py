"""The ONNX Runtime session: the one module that imports onnxruntime.

`OnnxModel` implements the worker's `Model` protocol (`run(input_ids, attention_mask,
token_type_ids) -> logits`), so tests can swap in a deliberately slow or failing model
where the point is timing; everywhere else a real `OnnxModel` runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batcher.bundle import ModelBundle
from batcher.config import ModelSettings
from batcher.errors import BundleError, StartupError

log = logging.getLogger(__name__)
# The server reports nothing about itself to anyone; ONNX Runtime would otherwise also try to
# store a telemetry device id under $HOME, which a read-only container does not have.
ort.disable_telemetry_events()

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxModel:
    """One ONNX Runtime session; `run` is safe to call from several threads at once."""

    def __init__(self, bundle: ModelBundle, settings: ModelSettings, provider: str | None = None) -> None:
        """`provider`: what `usable_provider` found (found again here when not given)."""
        provider = provider or usable_provider(settings, bundle.model_path)
        self.provider = provider
        self.session = _session(bundle.model_path, _options(settings), [provider] if provider == CPU else [CUDA, CPU])
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
        probe = np.ones((1, 4), dtype=np.int64)  # one row of four tokens: the output must be (1, labels)
        shape = self.run(probe, probe, np.zeros_like(probe)).shape
        if len(shape) != 2 or shape[1] != len(bundle.labels):
            raise BundleError(
                f"{bundle.model_path}: output {self._output} has shape {shape} for one row, "
                f"but the bundle has {len(bundle.labels)} labels"
            )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {name: given[name].astype(dtype, copy=False) for name, dtype in self._dtypes.items()}
        logits: np.ndarray = self.session.run([self._output], feed)[0]
        return logits


def usable_provider(settings: ModelSettings, probe: Path) -> str:
    """CUDA when model.device asks for it (or is "auto") and a session of `probe` really runs
    there; else the CPU. model.device = "cuda" without a usable GPU stops start-up."""
    want_cuda = settings.device == "cuda" or (settings.device == "auto" and CUDA in ort.get_available_providers())
    if not want_cuda:
        return CPU
    # onnxruntime-gpu lists CUDA even where its libraries are missing, then logs errors
    # and falls back; keep those quiet and judge by the providers the session really has.
    ort.set_default_logger_severity(4)
    try:
        session = _session(probe, _options(settings), [CUDA, CPU])
    finally:
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] == CUDA:
        return CUDA
    if settings.device == "cuda":
        raise StartupError("model.device = 'cuda' but ONNX Runtime cannot run on CUDA here; use 'auto' or 'cpu'")
    return CPU


def _options(settings: ModelSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION[settings.graph_optimization]
    spinning = "1" if settings.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    options.log_severity_level = 3
    return options


def _session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise BundleError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
