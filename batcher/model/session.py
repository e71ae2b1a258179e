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

from batcher.config import ModelSettings
from batcher.errors import BundleError, StartupError
from batcher.model.bundle import ModelBundle

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
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # fatal only
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxModel:
    """One ONNX Runtime session; `run` is safe to call from several threads at once.

    Adapts to what the export fixed where the fix is certain: a graph with a static sequence
    length gets every batch padded to it, one with a fixed batch size gets its rows in
    chunks of that size."""

    def __init__(
        self,
        bundle: ModelBundle,
        settings: ModelSettings,
        provider: str | None = None,
        *,
        output: str | None = None,
        pad_id: int = 0,
    ) -> None:
        """`provider`: what `usable_provider` found (found again here when not given);
        `output`: the output tensor to read (default `logits`, else the only output)."""
        provider = provider or usable_provider(settings, bundle.model_path)
        self.provider = provider
        self.path = bundle.model_path
        self.pad_id = pad_id
        self.session = _session(bundle.model_path, _options(settings), [provider] if provider == CPU else [CUDA, CPU])
        inputs = {node.name: node for node in self.session.get_inputs()}
        where = bundle.model_path
        if "input_ids" not in inputs:
            raise BundleError(f"{where}: the graph has no input_ids input (has {', '.join(inputs)})")
        unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise BundleError(
                f"{where}: unsupported graph inputs {', '.join(sorted(unknown))}; "
                "batcher feeds input_ids, attention_mask and token_type_ids"
            )
        self._dtypes: dict[str, Any] = {}
        for name, node in inputs.items():
            if node.type not in _DTYPES:
                raise BundleError(f"{where}: input {name} has type {node.type}; expected int64 or int32")
            self._dtypes[name] = _DTYPES[node.type]
        self.inputs = {name: (node.type, list(node.shape)) for name, node in inputs.items()}
        dims = list(inputs["input_ids"].shape)
        self.static_batch = dims[0] if len(dims) == 2 and isinstance(dims[0], int) and dims[0] > 0 else None
        self.static_length = dims[1] if len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0 else None
        outputs = {node.name: node for node in self.session.get_outputs()}
        self.outputs = {name: (node.type, list(node.shape)) for name, node in outputs.items()}
        if output is not None:
            if output not in outputs:
                raise BundleError(
                    f"{where}: model.output.name = {output!r} is not an output of the graph "
                    f"(it has {', '.join(outputs)})"
                )
            self._output = output
        elif "logits" in outputs or len(outputs) == 1:
            self._output = "logits" if "logits" in outputs else next(iter(outputs))
        else:
            raise BundleError(
                f"{where}: the graph has several outputs ({', '.join(outputs)}) and none is named logits; "
                "set model.output.name to the one with the scores"
            )
        self.output = self._output
        self.num_labels = len(bundle.labels)
        probe = np.ones((1, 4), dtype=np.int64)  # one row of four tokens: the output must be (1, labels)
        try:
            shape = self.run(probe, probe, np.zeros_like(probe), quiet=True).shape
        except Exception as exc:
            raise BundleError(f"{where}: a one-row probe failed in ONNX Runtime: {first_line(exc)}") from None
        if len(shape) != 2 or shape[1] != len(bundle.labels):
            raise BundleError(
                f"{where}: output {self._output} has shape {tuple(shape)} for one row, "
                f"but the bundle has {len(bundle.labels)} labels ({bundle.labels_from}); "
                "if another output holds the scores, set model.output.name"
            )

    def check(self, *, max_length: int, vocab_size: int) -> None:
        """Refuse at start what would fail at request time: an input of `max_length` tokens
        (the model's position table may be shorter) and the tokenizer's last token id (its
        vocabulary may be larger than the model's embedding table)."""
        where = self.path
        if self.static_length is not None and max_length > self.static_length:
            raise BundleError(
                f"{where}: the graph takes exactly {self.static_length} tokens but inputs may have {max_length}; "
                f"set model.max_seq_len = {self.static_length}"
            )
        ids = np.full((1, max_length), self.pad_id + 1 if self.pad_id + 1 < vocab_size else 1, dtype=np.int64)
        try:
            self.run(ids, np.ones_like(ids), np.zeros_like(ids), quiet=True)
        except Exception as exc:
            raise BundleError(
                f"{where}: an input of {max_length} tokens fails in ONNX Runtime ({first_line(exc)}); the model "
                "takes fewer: set model.max_seq_len (config.json max_position_embeddings says how many)"
            ) from None
        last = np.array([[1, vocab_size - 1, 1]], dtype=np.int64)
        try:
            self.run(last, np.ones_like(last), np.zeros_like(last), quiet=True)
        except Exception as exc:
            raise BundleError(
                f"{where}: the tokenizer has {vocab_size} tokens but its last id fails in the graph "
                f"({first_line(exc)}): the vocabulary is larger than the model's embedding table; "
                "the bundle's tokenizer is not the model's"
            ) from None

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray, *, quiet: bool = False
    ) -> np.ndarray:
        """Logits for a padded batch; `quiet`: a failure is the caller's to report, not ONNX
        Runtime's to log (start-up's probes)."""
        if self.static_length is not None and input_ids.shape[1] != self.static_length:
            input_ids, attention_mask, token_type_ids = _pad_to(
                self.static_length, self.pad_id, input_ids, attention_mask, token_type_ids
            )
        rows = input_ids.shape[0]
        if self.static_batch is not None and rows != self.static_batch:
            step = self.static_batch
            parts = []
            for start in range(0, rows, step):
                chunk = [a[start : start + step] for a in (input_ids, attention_mask, token_type_ids)]
                short = step - chunk[0].shape[0]
                if short:  # fill the last chunk with copies of its first row
                    chunk = [np.concatenate([a, np.repeat(a[:1], short, axis=0)]) for a in chunk]
                parts.append(self._run(*chunk, quiet=quiet)[: step - short])
            return np.concatenate(parts)
        return self._run(input_ids, attention_mask, token_type_ids, quiet=quiet)

    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray, *, quiet: bool = False
    ) -> np.ndarray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {name: given[name].astype(dtype, copy=False) for name, dtype in self._dtypes.items()}
        logits: np.ndarray = self.session.run([self._output], feed, _QUIET if quiet else None)[0]
        return logits


def _pad_to(length: int, pad_id: int, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> list[np.ndarray]:
    rows, have = ids.shape
    if have > length:  # the encoder cuts at max_seq_len, which check() held to the graph's length
        raise ValueError(f"{have} tokens for a graph that takes {length}")
    padded = [np.full((rows, length), value, dtype=np.int64) for value in (pad_id, 0, 0)]
    for target, source in zip(padded, (ids, mask, types), strict=True):
        target[:, :have] = source
    return padded


def first_line(exc: BaseException) -> str:
    """An ONNX Runtime error's first line, without its long preamble."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def final_op(path: Path, output: str) -> str | None:
    """The operator that computes `output` in the graph file (through Identity and Cast
    nodes), read from the ONNX protobuf without loading the weights; None if not found."""
    try:
        producers = _producers(path.read_bytes())
    except (OSError, ValueError, IndexError):
        return None
    name, seen = output, 0
    while name in producers and seen < 16:
        op, first_input = producers[name]
        if op not in ("Identity", "Cast") or first_input is None:
            return op
        name, seen = first_input, seen + 1
    return None


def _fields(data: memoryview) -> Any:
    """(field number, wire type, value) of a protobuf message; value is an int or a memoryview."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
            yield number, wire, value
        elif wire == 1:
            position += 8
        elif wire == 2:
            size, position = _varint(data, position)
            yield number, wire, data[position : position + size]
            position += size
        elif wire == 5:
            position += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _producers(raw: bytes) -> dict[str, tuple[str, str | None]]:
    """ModelProto.graph (7) -> GraphProto.node (1) -> NodeProto input (1), output (2), op_type (4)."""
    producers: dict[str, tuple[str, str | None]] = {}
    for number, wire, graph in _fields(memoryview(raw)):
        if number != 7 or wire != 2:
            continue
        for field, kind, node in _fields(graph):
            if field != 1 or kind != 2:
                continue
            inputs, outputs, op = [], [], ""
            for part, part_kind, value in _fields(node):
                if part_kind != 2:
                    continue
                if part == 1:
                    inputs.append(bytes(value).decode())
                elif part == 2:
                    outputs.append(bytes(value).decode())
                elif part == 4:
                    op = bytes(value).decode()
            for name in outputs:
                producers[name] = (op, inputs[0] if inputs else None)
    return producers


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
