"""Settings: one dataclass a section, each field documented where it is defined.

Values come from `config.toml`, then `BATCHER_<SECTION>__<KEY>` environment variables,
then `--set section.key=value` on the command line (later wins). Unknown keys and bad
values stop start-up with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from batcher.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
TokenizeOn = Literal["auto", "loop", "worker"]
LogLevel = Literal["debug", "info", "warning", "error"]
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = 8000
    """TCP port to listen on."""
    workers: int = 1
    """Processes serving the port (SO_REUSEPORT: the kernel spreads connections over them),
    each with its own event loop, batcher, ONNX Runtime session and `batching.instances`
    model threads, under a parent that restarts one that dies. One event loop costs
    ~190-290 µs of CPU per request here, which caps one process near 4,000 req/s: past
    that (a GPU, many cores), add workers. Size workers x instances x
    `model.intra_op_threads` to the cores (docs/deploy.md, "Sizing"); 1 fits 2 cores."""
    backlog: int = 2048
    """Pending TCP connections the kernel queues for accept (capped by net.core.somaxconn).
    A short backlog drops connection attempts in bursts, which clients see as 1 s stalls."""
    client_max_size_bytes: int = 256 * 1024
    """Largest request body; bigger gets 413 before it is read. A body is parsed whole on the
    event loop, and what it costs grows with its number of JSON values: 1 MiB of tiny items
    (41,000) took ~25 ms to parse and free here, stalling every other request that long;
    256 KiB bounds that near 6 ms. 64 dialogues of 128 tokens need ~100 KiB."""
    keepalive_timeout_s: float = 75.0
    """An idle connection (none of its requests in progress) is closed after this long,
    including one that never sends a request. Longer than common proxies' idle timeouts
    (60 s), so a proxy in front closes first; aiohttp's own default is an hour."""
    max_header_bytes: int = 8190
    """Longest request line and longest header field; longer gets 400 and a closed connection."""
    max_header_count: int = 128
    """Most header fields in a request; more gets 400 and a closed connection."""
    max_batch_items: int = 64
    """Most items one `POST /predict/batch` may carry; more get 413 (counted before the
    items are validated, so a huge batch costs the loop next to nothing)."""
    max_turns: int = 256
    """Most turns in one dialogue; more get 413. The model reads at most
    `model.max_seq_len` tokens from the end anyway."""
    max_text_chars: int = 10_000
    """Longest text of one turn, in characters; longer gets 413. Only the last
    4 x `model.max_seq_len` characters of a dialogue reach the tokenizer."""
    body_read_timeout_s: float = 10.0
    """Longest time to receive a request body; slower clients get 408 (slow-loris defence)."""
    auth_tokens_file: str = ""
    """File of bearer tokens, one a line. With tokens (from here or auth_tokens_env), the
    predict routes require `Authorization: Bearer <token>` and answer 401 without it."""
    auth_tokens_env: str = "BATCHER_AUTH_TOKENS"
    """Environment variable holding comma-separated bearer tokens (added to the file's)."""
    cors_allow_origins: str = ""
    """Browser origins allowed to call the API cross-origin, comma-separated
    (`"https://app.example.com, https://admin.example.com"`), or `"*"` for any. Empty: CORS
    is off, responses carry no CORS headers and preflight requests get 405."""
    cors_max_age_s: int = 600
    """How long a browser may cache a preflight answer."""
    admin_enabled: bool = False
    """Serve `POST /models/{name}/reload` (behind the bearer tokens when any are set); off,
    the route answers 404 and only SIGHUP reloads."""
    expose_docs: bool = True
    """Serve /docs and /openapi.json."""
    expose_metrics: bool = True
    """Serve /metrics."""
    metrics_port: int = 0
    """Serve /metrics on this port of server.host instead of the main listener; 0 = main listener."""
    drain_delay_s: float = 0.0
    """On SIGTERM, how long predictions are still admitted while /readyz already fails, so
    load balancers and Kubernetes endpoints stop routing here first; new predictions get
    503 after it. Every response from SIGTERM on carries `Connection: close`."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long admitted requests may take to be answered; what is still
    unanswered then gets 503, and the process exits (a hung model run is left behind)."""
    liveness_hang_s: float = 60.0
    """`/healthz` answers 503 once a model run has lasted this long (the model hangs and
    holds a worker thread for good) or the batcher loop has stopped: liveness probes then
    restart the process. Readiness fails sooner, after `batching.request_timeout_s`."""
    log_level: LogLevel = "info"
    """Logging verbosity of the server."""
    access_log: bool = False
    """Log one line per request (costs event-loop time under load)."""

    def __post_init__(self) -> None:
        _check_range("server.port", self.port, 0, 65535)
        _check_range("server.workers", self.workers, 1, 256)
        _check_range("server.drain_delay_s", self.drain_delay_s, 0, 3600)
        _check_range("server.backlog", self.backlog, 1, 65535)
        _check_range("server.client_max_size_bytes", self.client_max_size_bytes, 1024, 1 << 30)
        _check_range("server.max_batch_items", self.max_batch_items, 1, 100_000)
        _check_range("server.max_turns", self.max_turns, 1, 100_000)
        _check_range("server.max_text_chars", self.max_text_chars, 1, 1 << 24)
        _check_range("server.liveness_hang_s", self.liveness_hang_s, 0.1, 86_400)
        _check_range("server.keepalive_timeout_s", self.keepalive_timeout_s, 0.1, 86_400)
        _check_range("server.max_header_bytes", self.max_header_bytes, 256, 1 << 20)
        _check_range("server.max_header_count", self.max_header_count, 8, 10_000)
        _check_range("server.shutdown_timeout_s", self.shutdown_timeout_s, 0, 3600)
        _check_range("server.body_read_timeout_s", self.body_read_timeout_s, 0.01, 3600)
        _check_range("server.metrics_port", self.metrics_port, 0, 65535)
        _check_range("server.cors_max_age_s", self.cors_max_age_s, 0, 86_400)
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError(
                    f"server.cors_allow_origins: {origin!r} is not an origin; expected scheme://host[:port] or *"
                )

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """The allowed origins, parsed; empty when CORS is off."""
        return tuple(dict.fromkeys(item.strip() for item in self.cors_allow_origins.split(",") if item.strip()))


InputKind = Literal["text", "pair", "dialogue"]
TurnsKept = Literal["all", "last_user"]
Side = Literal["right", "left"]
OutputFunction = Literal["auto", "softmax", "sigmoid", "none"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputSettings:
    """How a request becomes the text the model reads (`[model.input]`). Every key left
    unset takes the bundle's declaration (`batcher.json` in the bundle), else what Hugging
    Face's text-classification pipeline does: the text as given, a pair through the
    tokenizer's own pair template, cut at the right."""

    format: InputKind | None = None
    """`text` (one text; a pair when a request sends one), `pair` (the model reads pairs:
    a lone text is refused with 422), or `dialogue` (turns rendered by the template below)."""
    turns: TurnsKept | None = None
    """Dialogue: `all` turns, oldest first, or only the `last_user` turn. A `text` model
    reads the last user turn of a `turns` request."""
    user_marker: str | None = None
    """Dialogue: text put before each user turn (default none)."""
    other_marker: str | None = None
    """Dialogue: text put before every other speaker's turn (default none)."""
    separator: str | None = None
    """Dialogue: text between turns; default the tokenizer's own separator token."""
    truncation_side: Side | None = None
    """Which end is cut when the input is too long: `right` (the pipeline's; default for
    text and pairs) or `left` (keeps the end; default for dialogues)."""
    clean: bool | None = None
    """Dialogue: drop invisible characters, fold whitespace and neutralise user text that
    spells a marker or `[SEP]` (default: on for dialogues)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputSettings:
    """How the graph's scores become an answer (`[model.output]`); unset keys take the
    bundle's declaration, else the defaults."""

    function: OutputFunction | None = None
    """`auto` (default): transformers' rule (sigmoid for problem_type =
    multi_label_classification or one label, none for regression or a graph that ends in
    Softmax/Sigmoid, softmax otherwise); or `softmax`, `sigmoid`, `none`."""
    name: str | None = None
    """The output tensor to read; default `logits`, else the graph's only 2-D float output."""
    threshold: float | None = None
    """Multi-label models: labels at or above this probability are listed (default 0.5)."""
    abstain_threshold: float | None = None
    """Single-label models: below this confidence the answer is `abstain_label` with the
    best guess still reported (default 0: never abstain)."""
    abstain_label: str | None = None
    """The label of an abstained answer (default `none`)."""

    def __post_init__(self) -> None:
        if self.threshold is not None:
            _check_range("model.output.threshold", self.threshold, 0.0, 1.0)
        if self.abstain_threshold is not None:
            _check_range("model.output.abstain_threshold", self.abstain_threshold, 0.0, 1.0)


SUBSECTIONS: dict[str, type[Any]] = {"input": InputSettings, "output": OutputSettings}
"""The tables inside [model] (and [models.NAME])."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
    path: str = "models/intent-zh"
    """Model bundle directory: model.onnx, tokenizer.json or vocab.txt, labels.json or config.json
    (what `save_pretrained` and an ONNX export write). A relative path is resolved against
    the directory of the config file."""
    file: str = "auto"
    """Graph file inside the bundle. "auto": the quantized `model.int8.onnx` on the CPU when the
    bundle has it (same accuracy, ~1.4x the sequences/s here), `model.fp16.onnx` or else
    `model.onnx` on CUDA (dynamic int8 runs on the CPU only). A name serves that file."""
    name: str = ""
    """The model's name: in its routes (`/models/{name}/predict`), `GET /models`, the
    `model` label of every metric, and the Open Inference Protocol's routes. Empty: the
    bundle directory's name."""
    max_seq_len: int = 0
    """Longest token sequence fed to the model. 0: the bundle's own (batcher.json's
    max_length, else tokenizer_config.json's model_max_length, else the position table
    of config.json), capped by the position table."""
    device: Device = "auto"
    """`auto` uses CUDA only when a session really runs on it, else CPU."""
    intra_op_threads: int = 1
    """Threads ONNX Runtime uses inside one operator; 0 = one per core. With
    batching.instances = 2 on 2 cores, one thread per run measured fastest (BENCHMARKS.md)."""
    inter_op_threads: int = 1
    """Threads ONNX Runtime uses across independent operators."""
    graph_optimization: GraphOptimization = "all"
    """ONNX Runtime graph optimization level."""
    allow_spinning: bool = False
    """Let ORT worker threads busy-wait between ops. Off by default: they share the
    cores with the event loop, and spinning starves it (measured in BENCHMARKS.md)."""
    warmup_runs: int = 2
    """Warm-up passes over several batch sizes and lengths before /readyz turns 200."""
    input: InputSettings = dataclasses.field(default_factory=InputSettings)
    """`[model.input]`: the input format (see InputSettings)."""
    output: OutputSettings = dataclasses.field(default_factory=OutputSettings)
    """`[model.output]`: the output function and answers (see OutputSettings)."""

    def __post_init__(self) -> None:
        if self.name and not _MODEL_NAME.fullmatch(self.name):
            raise ConfigError(f"model.name = {self.name!r}: letters, digits, '_' and '-' only, at most 64")
        if self.max_seq_len:
            _check_range("model.max_seq_len", self.max_seq_len, 8, 65536)
        _check_range("model.intra_op_threads", self.intra_op_threads, 0, 256)
        _check_range("model.inter_op_threads", self.inter_op_threads, 0, 256)
        _check_range("model.warmup_runs", self.warmup_runs, 0, 100)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchingSettings:
    max_batch_size: int = 32
    """Most requests in one model run. 1 disables batching. The tuning sweep in BENCHMARKS.md
    found 32 at least as fast as 8, 16 or 64 at 64 clients, with the lowest open-loop p99."""
    max_batch_tokens: int = 8192
    """Most padded tokens (rows x longest row) in one model run."""
    max_wait_s: float = 0.002
    """Longest time the oldest queued request waits for company while the model is idle.
    The wait adapts to the arrival rate: a lone client does not wait."""
    max_queue_size: int = 256
    """Requests admitted but not yet running; past it, 429 with Retry-After. 256 is ~0.2 s of
    work at the bundled model's maximum on 2 cores: under a 3x overload admitted requests
    kept a p99 of ~0.4 s (~1.1 s at 1024) and refusals stayed faster (RELIABILITY.md).
    Raise it with the hardware's throughput (roughly 0.2 s x requests/s)."""
    max_queue_wait_s: float = 0.0
    """Under overload, the requests queued and running are held to the work the model does
    in this long at its measured pace (the median of its last 32 runs), though never below
    a full batch for every instance and a staged one (96 rows with the defaults): a request
    that would wait behind more, counting requests of its own priority or higher, is
    refused at the door (429) with `Retry-After` set to the queue's drain. A standing queue
    adds wait, not throughput: in a retry storm of 512 connections here a new client's p99
    fell from ~0.3 s with the count bound alone to ~0.15 s (BENCHMARKS.md), while 100
    closed-loop clients (~0.06 s of work here) are never refused. Off (0) by default: at
    0.1 s a 10-minute soak at 70 % load on this shared 2-core machine got 871 refusals in
    its slow minutes (RELIABILITY.md at dd372b0), against 0 to 94 in earlier soaks with
    count-only admission. 0 keeps only `max_queue_size`, which bounds the count regardless."""
    request_timeout_s: float = 10.0
    """Deadline from admission to answer; a request still queued then gets 504 and is
    never computed."""
    worker_sched_idle: bool = True
    """Run the model's worker threads under Linux's SCHED_IDLE policy: any other runnable
    thread, the event loop first, takes a core from them at once. In a 3x overload here it
    cut the loop's run-queue wait from ~140 to ~35 ms per second and the 429s' p99 from
    ~8 to ~4 ms; throughput at 64 clients was the same within noise (side by side in
    RELIABILITY.md).
    The price: the model only gets the CPU that no normal-priority process wants, so on a
    machine shared with other busy work set this to false and use `worker_nice`. Only the
    threads that call the model get it: ONNX Runtime's own intra-op pool (when
    `model.intra_op_threads` > 1) keeps the policy of the thread that loaded the model."""
    worker_nice: int = 5
    """Niceness added to the model's worker threads when `worker_sched_idle` is false (or
    the policy is refused), so the event loop is still scheduled first."""
    instances: int = 2
    """Model runs that may be in flight at once (worker threads sharing one session).
    Two single-threaded runs use 2 cores better than one two-threaded run (BENCHMARKS.md)."""
    lone_threads: int = -1
    """A lone request (the model otherwise idle, nothing else queued, and recent arrivals
    found the server empty) runs on a second ONNX Runtime session with this many intra-op
    threads (spinning allowed), on a thread of normal priority, instead of one instance's
    single thread: a lone client uses every core, while with two or more clients, and under
    load, the instances' layout stays. -1 = one per core the process may
    use; 0 = off. The second session costs the model's memory again. CPU only (on CUDA
    the setting is ignored)."""
    coalesce: bool = False
    """Requests whose model input (token ids and type ids) is identical while they wait
    share one row of a batch; each gets its own answer (`batcher_coalesced_rows_total`).
    A request joins a waiting twin of its priority or higher, and shares its deadline."""
    tokenize_on: TokenizeOn = "auto"
    """Where texts become token ids: `loop` (each request as it arrives, on the event
    loop), `worker` (a whole batch in one call on the model thread, the GIL released), or
    `auto`: the worker on CUDA, where the model threads mostly wait for the GPU and the
    loop is the limit; the loop on the CPU, where the model threads are the limit and the
    loop has room (side by side on 2 cores, tokenizing on the worker cut the loop's CPU a
    request by ~25 % but the throughput at 64 clients by 5-9 %)."""

    def __post_init__(self) -> None:
        _check_range("batching.max_batch_size", self.max_batch_size, 1, 4096)
        _check_range("batching.max_batch_tokens", self.max_batch_tokens, 1, 1 << 24)
        _check_range("batching.max_wait_s", self.max_wait_s, 0, 10)
        _check_range("batching.max_queue_size", self.max_queue_size, 1, 1 << 20)
        _check_range("batching.max_queue_wait_s", self.max_queue_wait_s, 0, 3600)
        _check_range("batching.request_timeout_s", self.request_timeout_s, 0.001, 3600)
        _check_range("batching.instances", self.instances, 1, 64)
        _check_range("batching.lone_threads", self.lone_threads, -1, 256)
        _check_range("batching.worker_nice", self.worker_nice, 0, 19)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSettings:
    max_entries: int = 0
    """Answers kept in an LRU keyed by model version and the text the model reads: a
    repeated dialogue is answered without queueing or running the model. 0 = off. Each
    entry holds the text and one row of probabilities (under a few KiB)."""

    def __post_init__(self) -> None:
        _check_range("cache.max_entries", self.max_entries, 0, 10_000_000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogSettings:
    predictions: float = 0.0
    """Share of answered predictions written as one JSON line each (logger
    `batcher.predictions`): time, request id, model and version, intent, confidence, batch
    size, queue and inference ms. 0 = off, 1 = every one."""
    prediction_text: bool = False
    """Include the dialogue's turns in those lines. Off by default: it is user data."""
    predictions_file: str = ""
    """Write the prediction lines to this file (JSON lines, reopened when rotated) instead of
    the server's log. A relative path is resolved against the config file's directory."""

    def __post_init__(self) -> None:
        _check_range("log.predictions", self.predictions, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name, bundle settings, batching settings and bundle directory."""

    name: str
    model: ModelSettings
    batching: BatchingSettings
    directory: Path


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    batching: BatchingSettings = dataclasses.field(default_factory=BatchingSettings)
    cache: CacheSettings = dataclasses.field(default_factory=CacheSettings)
    log: LogSettings = dataclasses.field(default_factory=LogSettings)
    models: tuple[ModelSpec, ...] = ()
    """More models than the default one, from `[models.NAME]` tables (same keys as [model],
    plus a `[models.NAME.batching]` table that overrides [batching])."""
    base_dir: Path = Path(".")
    """Directory relative model paths are resolved against (the config file's)."""

    @property
    def model_dir(self) -> Path:
        return self.resolve(self.model.path)

    def resolve(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.base_dir / path

    @property
    def served(self) -> tuple[ModelSpec, ...]:
        """Every model to serve, the default ([model]) first."""
        return (ModelSpec(self.model.name, self.model, self.batching, self.model_dir), *self.models)

    def describe(self, spec: ModelSpec | None = None) -> dict[str, str]:
        """Flat `section.key -> value` view of one model's settings, for logs and the
        model-info metric (the default model's without `spec`)."""
        spec = spec or self.served[0]
        flat: dict[str, str] = {}
        for section, values in (("server", self.server), ("model", spec.model), ("batching", spec.batching)):
            for field in dataclasses.fields(values):
                value = getattr(values, field.name)
                if dataclasses.is_dataclass(value):
                    for inner in dataclasses.fields(value):
                        flat[f"{section}.{field.name}.{inner.name}"] = str(getattr(value, inner.name))
                else:
                    flat[f"{section}.{field.name}"] = str(value)
        return flat


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "model": ModelSettings,
    "batching": BatchingSettings,
    "cache": CacheSettings,
    "log": LogSettings,
}
MODELS = "models"
ENV_PREFIX = "BATCHER_"
# Durations are named and given in seconds (`_s`). Keys of the old millisecond names still
# work, converted, with a warning: (section, old key) -> (new key, factor to seconds).
RENAMED: dict[tuple[str, str], tuple[str, float]] = {
    ("batching", "max_wait_ms"): ("max_wait_s", 0.001),
    ("batching", "request_timeout_ms"): ("request_timeout_s", 0.001),
}


def load_settings(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> Settings:
    """Read `path` (if given), then environment overrides, then `section.key=value` overrides
    (`models.NAME.key=value` and `models.NAME.batching.key=value` for the extra models)."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in (*_SECTIONS, MODELS)}
    base_dir = Path(".")
    if path is not None:
        base_dir = path.parent
        _merge(raw, _read_toml(path), source=str(path))
    env_values = os.environ if env is None else env
    for key, value in sorted(env_values.items()):
        if key.startswith(ENV_PREFIX) and "__" in key:
            path_parts = key[len(ENV_PREFIX) :].lower().split("__")
            _merge(raw, _nested(path_parts, _parse_scalar(value)), source=f"environment {key}")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. batching.max_wait_s=0.002")
        _merge(raw, _nested(parts, _parse_scalar(value.strip())), source=f"--set {item}")
    sections = {name: _build_section(name, raw[name]) for name in _SECTIONS}
    if not sections["model"].name:  # named after its bundle
        sections["model"] = dataclasses.replace(sections["model"], name=bundle_name(sections["model"].path))
    models = tuple(_build_model(name, table, sections, base_dir) for name, table in raw[MODELS].items())
    names = [sections["model"].name, *(spec.name for spec in models)]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique; got {', '.join(names)}")
    return Settings(base_dir=base_dir, models=models, **sections)


def bundle_name(path: str) -> str:
    """A model name from a bundle directory's name: characters a name cannot hold become '-'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).resolve().name).strip("-_")[:64]
    return name if name else "model"


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    """["models", "b", "file"], v -> {"models": {"b": {"file": v}}}."""
    tree: Any = value
    for part in reversed(path):
        tree = {part: tree}
    return dict(tree)


def _build_model(name: str, table: Mapping[str, Any], sections: Mapping[str, Any], base_dir: Path) -> ModelSpec:
    """One [models.NAME] table: the default model's settings, overridden by the table."""
    values: dict[str, Any] = dataclasses.asdict(sections["model"])
    for key, value in table.items():
        if key in SUBSECTIONS:
            values[key] = {**values[key], **value}
        elif key != "batching":
            values[key] = value
    model = _build_section("model", {**values, "name": name})
    batching = _build_section("batching", {**dataclasses.asdict(sections["batching"]), **table.get("batching", {})})
    path = Path(model.path)
    return ModelSpec(name, model, batching, path if path.is_absolute() else base_dir / path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _merge(raw: dict[str, dict[str, Any]], values: Mapping[str, Any], *, source: str) -> None:
    for section, table in values.items():
        if section not in _SECTIONS and section != MODELS:
            allowed = ", ".join((*_SECTIONS, MODELS))
            raise ConfigError(f"{source}: unknown section [{section}]; allowed: {allowed}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
        if section == MODELS:
            for name, model in table.items():
                _merge_model(raw[MODELS], name, model, source=source)
        else:
            _merge_table(raw[section], section, table, source=source)


def _merge_table(target: dict[str, Any], section: str, table: Mapping[str, Any], *, source: str) -> None:
    known = {field.name for field in dataclasses.fields(_SECTIONS[section])}
    for key, value in table.items():
        if (section, key) in RENAMED:
            key, value = _renamed(section, key, value, source)
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{source}: unknown key {section}.{key}; allowed: {allowed}")
        if section == "model" and key in SUBSECTIONS:
            _merge_subsection(target.setdefault(key, {}), f"{section}.{key}", SUBSECTIONS[key], value, source=source)
        else:
            target[key] = value


def _merge_subsection(target: dict[str, Any], where: str, cls: type[Any], table: Any, *, source: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [{where}] must be a table")
    known = {field.name for field in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {where}.{key}; allowed: {', '.join(sorted(known))}")
        target[key] = value


def _merge_model(models: dict[str, Any], name: str, table: Any, *, source: str) -> None:
    if not _MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{source}: [models.{name}]: a model name is letters, digits, '_' and '-' only")
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [models.{name}] must be a table")
    target = models.setdefault(name, {})
    for key, value in table.items():
        if key == "batching":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [models.{name}.batching] must be a table")
            _merge_table(target.setdefault("batching", {}), "batching", value, source=source)
        elif key == "name":
            raise ConfigError(f"{source}: models.{name}.name: the table's name is the model's name")
        else:
            _merge_table(target, "model", {key: value}, source=source)


def _renamed(section: str, key: str, value: Any, source: str) -> tuple[str, Any]:
    new, factor = RENAMED[(section, key)]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {section}.{key} = {value!r} must be a number")
    seconds = value * factor
    warnings.warn(
        f"{source}: {section}.{key} is deprecated; use {section}.{new} = {seconds:g}", FutureWarning, stacklevel=4
    )
    return new, seconds


def _parse_scalar(text: str) -> Any:
    """Read an override as a TOML value (`2`, `true`, `"cpu"`), else as a bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _build_section(name: str, values: Mapping[str, Any], cls: type[Any] | None = None) -> Any:
    cls = cls or _SECTIONS[name]
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        inner = SUBSECTIONS.get(key) if name == "model" else None
        if inner is not None and isinstance(value, Mapping):
            checked[key] = _build_section(f"{name}.{key}", value, inner)
        elif inner is not None and dataclasses.is_dataclass(value):
            checked[key] = value
        else:
            checked[key] = _check_type(f"{name}.{key}", value, hints[key])
    return cls(**checked)


def _check_type(key: str, value: Any, expected: Any) -> Any:
    if get_origin(expected) in (typing.Union, types.UnionType):  # X | None: None is "unset"
        if value is None:
            return None
        (expected,) = [arg for arg in get_args(expected) if arg is not type(None)]
    if get_origin(expected) is Literal:
        allowed = get_args(expected)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{key} = {value!r} must be of type {expected.__name__}")
    return value


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} = {value} is out of range; allowed: {low} to {high}")
