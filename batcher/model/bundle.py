"""A model bundle on disk: what `save_pretrained` and an ONNX exporter write (the graph, its
external weights, `config.json`, the tokenizer's files), plus an optional `batcher.json`
declaring how the model is fed and scored; the content hash that versions it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from batcher.errors import BundleError

DECLARATION = "batcher.json"
"""The bundle's own serving declaration: {"input": {...}, "output": {...}, "max_length": N},
the keys of [model.input] and [model.output] (config.py), which override it."""


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
    labels_from: str = "labels.json"
    """The file the labels were read from."""
    config: dict[str, Any] = field(default_factory=dict)
    """`config.json` ({} when absent): problem_type, max_position_embeddings, model_type."""
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    """`tokenizer_config.json` with `special_tokens_map.json` over it ({} when absent)."""
    declared: dict[str, Any] = field(default_factory=dict)
    """`batcher.json` ({} when absent)."""

    @property
    def name(self) -> str:
        return self.directory.resolve().name

    @property
    def problem_type(self) -> str | None:
        value = self.config.get("problem_type")
        return value if isinstance(value, str) else None

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.config)


def max_positions(config: dict[str, Any]) -> int | None:
    """Token positions the model's position table holds, when config.json says: RoBERTa-
    family tables start after the padding index, so they hold two fewer."""
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    if config.get("model_type") in OFFSET_POSITIONS:
        pad = config.get("pad_token_id", 1)
        value -= (pad if isinstance(pad, int) else 1) + 1
    return value


OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "xlm-roberta-xl"})
"""config.json model types whose position ids start at pad_token_id + 1."""

# model.file = "auto": the graph for the device, first that the bundle has. Dynamic int8
# quantisation runs on the CPU only (and ran ~1.4x the sequences/s of fp32 here at the same
# accuracy, models/intent-zh/README.md); on CUDA, fp16 where the bundle has it. Optimum names
# its quantized graph model_quantized.onnx; hub repositories keep graphs under onnx/. A graph
# only in fp16 is taken when it is all the bundle has.
_INT8 = ("model.int8.onnx", "model_quantized.onnx", "model_int8.onnx", "model_qint8.onnx")
_FP32 = ("model.onnx",)
_FP16 = ("model.fp16.onnx", "model_fp16.onnx")
_CPU = (*_INT8, *_FP32, *_FP16)
_CUDA = (*_FP16, *_FP32, *_INT8)
AUTO_GRAPHS = {
    "cpu": (*_CPU, *(f"onnx/{name}" for name in _CPU)),
    "cuda": (*_CUDA, *(f"onnx/{name}" for name in _CUDA)),
}


def choose_graph(directory: Path, file: str, *, on_gpu: bool) -> str:
    """The graph file to serve: `file` itself, or for "auto" the device's best the bundle has."""
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} is not a directory")
    others = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*.onnx"))
    found = f"; it has {', '.join(others[:5])}: set model.file" if others else ""
    if file != "auto":
        if not (directory / file).is_file():
            raise BundleError(f"{directory / file} is missing (model.file = {file!r}){found}")
        return file
    candidates = AUTO_GRAPHS["cuda" if on_gpu else "cpu"]
    present = [name for name in candidates if (directory / name).is_file()]
    if not present:
        raise BundleError(f"{directory}: model.file = 'auto' found no graph ({', '.join(candidates[:4])}, ...){found}")
    return present[0]


def load_bundle(directory: Path, file: str = "model.onnx", settings_key: str = "") -> ModelBundle:
    """Check a bundle directory and read its labels and configuration files; errors name the
    file and the problem. `settings_key` (the effective format and output settings) goes
    into the version with the files."""
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} is not a directory")
    model_path = directory / file
    if not model_path.is_file():
        raise BundleError(f"{model_path} is missing")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    config, tokenizer_config, declared = read_configs(directory)
    labels, labels_from = _read_labels(directory, config)
    version = bundle_version(directory, file, settings_key)
    return ModelBundle(directory, model_path, labels, digest, version, labels_from, config, tokenizer_config, declared)


S = TypeVar("S")


def declared_settings(declared: dict[str, Any], section: str, settings: S) -> S:
    """[model.SECTION] (`settings`, a dataclass whose unset keys are None) over batcher.json's
    SECTION table, key by key; keys neither sets stay None. Unknown or ill-typed keys in the
    declaration stop start-up naming the file."""
    given = declared.get(section, {})
    if not isinstance(given, dict):
        raise BundleError(f"{DECLARATION}: {section} must be an object")
    known = {field.name for field in dataclasses.fields(settings)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - known)
    if unknown:
        raise BundleError(
            f"{DECLARATION}: unknown {section} keys {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    chosen = {**given, **{k: v for k, v in dataclasses.asdict(settings).items() if v is not None}}  # type: ignore[call-overload]
    try:
        return type(settings)(**{key: chosen.get(key) for key in known})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{DECLARATION}: {exc}") from None


def read_configs(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """config.json, tokenizer_config.json with special_tokens_map.json over it, and
    batcher.json: {} for each that is absent."""
    tokenizer_config = {
        **_read_optional(directory / "tokenizer_config.json"),
        **_read_optional(directory / "special_tokens_map.json"),
    }
    return _read_optional(directory / "config.json"), tokenizer_config, _read_optional(directory / DECLARATION)


VERSIONED = (
    "tokenizer.json",
    "vocab.txt",
    "labels.json",
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    DECLARATION,
)


def bundle_version(directory: Path, file: str, settings_key: str = "") -> str:
    """The content hash of everything that decides an answer: the graph and its external
    weights (`model.onnx.data`, `model.onnx_data`: files named after the graph), the
    tokenizer's and the model's configuration files, the labels, and `settings_key`
    (the effective format and output settings). Twelve hex digits; the same files and
    settings give the same version on every machine."""
    digest = hashlib.sha256()
    graph = directory / file
    weights = sorted(p.name for p in graph.parent.glob(f"{graph.name}?*") if p.is_file() and p.suffix != ".onnx")
    for name in (file, *(str(Path(file).parent / w) for w in weights), *VERSIONED):
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + _file_digest(path))
    if settings_key:
        digest.update(b"settings\0" + settings_key.encode())
    return digest.hexdigest()[:12]


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _read_labels(directory: Path, config: dict[str, Any]) -> tuple[list[str], str]:
    labels_path = directory / "labels.json"
    if labels_path.is_file():
        path, data = labels_path, _read_json(labels_path)
        labels = data.get("labels", data.get("id2label")) if isinstance(data, dict) else data
    elif config:
        path, labels = directory / "config.json", config.get("id2label")
        if labels is None:  # transformers' own default names; it leaves them out of config.json
            count = config.get("num_labels", 2)  # and num_labels too when it is its default, 2
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                return [f"LABEL_{index}" for index in range(count)], "config.json (transformers' default names)"
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
    return labels, path.name + (" id2label" if path.name == "config.json" else "")


def _read_optional(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read JSON: {exc}") from None
