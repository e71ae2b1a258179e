"""Request and response shapes. Requests are validated with these models; responses are
built as plain dicts on the hot path and the models document them in /openapi.json
(the handler tests check real responses against them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictStr

from batcher.errors import ValidationFailed
from batcher.model.dialogue import VISIBLE, is_blank

SPEAKER_MAX_CHARS = 32
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
"""An `x-request-id` a client sends is echoed when it matches; otherwise one is generated."""
M = TypeVar("M", bound="BaseModel")


class Turn(BaseModel):
    """One utterance of the dialogue."""

    model_config = ConfigDict(extra="ignore")

    speaker: Annotated[StrictStr, Field(min_length=1, max_length=SPEAKER_MAX_CHARS, examples=["user"])] = "user"
    text: Annotated[StrictStr, Field(examples=["我们有空一起去看风景好不好"])]


Priority = Literal["high", "normal", "low"]
DeadlineMs = Annotated[float, Field(ge=100, le=3_600_000)]
PRIORITY_FIELD = Field(
    default=None,
    description="high, normal (default) or low: higher goes first (none waits more than 1 s longer than "
    "without priorities) and low is refused first under overload. Also the x-priority header.",
)
DEADLINE_FIELD = Field(
    default=None,
    description="The client's own deadline, ms from arrival (capped by batching.request_timeout_s): a request "
    "that cannot be answered in time gets 429 predicted_late at once, never a late answer. Also x-deadline-ms.",
)


class PredictRequest(BaseModel):
    """A dialogue, oldest turn first; the intent is that of its end."""

    model_config = ConfigDict(extra="ignore")

    turns: Annotated[
        list[Turn],
        Field(
            min_length=1,
            description="Oldest first; at least one turn must have non-blank text.",
            json_schema_extra={
                "contains": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {"text": {"type": "string", "pattern": VISIBLE}},
                }
            },
        ),
    ]
    return_all_probs: StrictBool = False
    priority: Priority | None = PRIORITY_FIELD
    deadline_ms: DeadlineMs | None = DEADLINE_FIELD

    @pydantic.field_validator("turns")
    @classmethod
    def _has_text(cls, turns: list[Turn]) -> list[Turn]:
        if all(is_blank(turn.text) for turn in turns):
            raise ValueError("no turn has non-blank text")
        return turns


def _not_blank(value: str | None) -> str | None:
    if value is not None and is_blank(value):
        raise ValueError("must be non-blank (have a visible character)")
    return value


VisibleText = Annotated[StrictStr, Field(json_schema_extra={"pattern": VISIBLE}, examples=["play some jazz"])]


class TextRequest(BaseModel):
    """One text, or a pair of texts for a model that reads pairs (query and passage, two
    sentences): the pair goes through the tokenizer's own pair template."""

    model_config = ConfigDict(extra="ignore")

    text: VisibleText
    text_pair: Annotated[
        StrictStr | None, Field(json_schema_extra={"pattern": VISIBLE}, description="The pair's second text.")
    ] = None
    return_all_probs: StrictBool = False
    priority: Priority | None = PRIORITY_FIELD
    deadline_ms: DeadlineMs | None = DEADLINE_FIELD

    _visible = pydantic.field_validator("text", "text_pair")(_not_blank)


OneInput = Annotated[list[VisibleText], Field(min_length=1, max_length=2)]
FunctionName = Literal["softmax", "sigmoid", "none"]


class InputsParameters(BaseModel):
    """The Hugging Face Inference API's parameters for text classification."""

    model_config = ConfigDict(extra="ignore")

    top_k: Annotated[int, Field(ge=1, le=100_000, description="Answer only the k best labels.")] | None = None
    function_to_apply: FunctionName | None = Field(
        default=None, description="softmax, sigmoid or none (raw scores); default: the model's own."
    )


class InputsRequest(BaseModel):
    """The text-embeddings-inference and Hugging Face shape: `inputs` is one text, a pair
    `[a, b]`, or a batch `[[text], [a, b], ...]`. The answer is every label with its score,
    highest first (a list of those for a batch; with `parameters`, as the Hugging Face
    Inference API and `huggingface_hub` expect, a single input's answer comes as a list of
    one list)."""

    model_config = ConfigDict(extra="ignore")

    inputs: VisibleText | OneInput | Annotated[list[OneInput], Field(min_length=1)] = Field(
        examples=["play some jazz", ["how do I reset it?", "Hold the button for ten seconds."]]
    )
    raw_scores: StrictBool = Field(default=False, description="Scores without the output function.")
    truncate: StrictBool | None = Field(
        default=None, description="Cut inputs longer than the model's maximum (default); false: 413 instead."
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = None
    parameters: InputsParameters | None = None
    priority: Priority | None = PRIORITY_FIELD
    deadline_ms: DeadlineMs | None = DEADLINE_FIELD

    def texts(self) -> list[tuple[str, str | None]]:
        """Each input as (text, pair or None)."""
        inputs = self.inputs
        if isinstance(inputs, str):
            return [(inputs, None)]
        if all(isinstance(item, str) for item in inputs):
            return [_pair(inputs)]  # type: ignore[arg-type]
        return [_pair(item) for item in inputs]  # type: ignore[arg-type]

    @pydantic.field_validator("inputs", mode="before")
    @classmethod
    def _shape(cls, inputs: Any) -> Any:
        if isinstance(inputs, str):
            if is_blank(inputs):
                raise ValueError("the text must be non-blank (have a visible character)")
            return inputs
        shape = "expected a text, a pair [a, b], or a batch [[text], [a, b], ...]"
        if not isinstance(inputs, list) or not inputs:
            raise ValueError(shape)
        items = [inputs] if all(isinstance(item, str) for item in inputs) else inputs
        for index, item in enumerate(items):
            if not isinstance(item, list) or not 1 <= len(item) <= 2 or not all(isinstance(t, str) for t in item):
                raise ValueError(shape)
            if any(is_blank(text) for text in item):
                raise ValueError(f"input {index}: a text must be non-blank (have a visible character)")
        return inputs

    @property
    def batch(self) -> bool:
        return not isinstance(self.inputs, str) and not all(isinstance(item, str) for item in self.inputs)


def _pair(item: list[str]) -> tuple[str, str | None]:
    return (item[0], item[1]) if len(item) == 2 else (item[0], None)


class LabelScore(BaseModel):
    label: str
    score: float


class ScoresResponse(RootModel[list[LabelScore] | list[list[LabelScore]]]):
    """An `inputs` request's answer: its labels with their scores, highest first; a list of
    those for a batch (or a single input sent with `parameters`)."""


class BatchPredictRequest(BaseModel):
    """Several dialogues or texts; each is batched with other traffic on its own."""

    model_config = ConfigDict(extra="ignore")

    items: Annotated[list[PredictRequest | TextRequest], Field(min_length=1)]
    priority: Priority | None = PRIORITY_FIELD
    deadline_ms: DeadlineMs | None = DEADLINE_FIELD


class Timing(BaseModel):
    """Where this request's time went."""

    queue_ms: float = Field(description="Admission to the start of its model run.")
    inference_ms: float = Field(description="Wall time of the model run it was part of.")
    total_ms: float = Field(description="Handler receiving the request to the response being ready.")
    batch_size: int = Field(description="Requests in the model run it was part of (0: from the cache).")
    cached: bool | None = Field(default=None, description="Present and true when the answer came from the cache.")


class Intent(BaseModel):
    id: int
    name: str


class PredictResponse(BaseModel):
    intent_id: int
    intent_name: str
    confidence: float
    inference_time_ms: float = Field(description="Wall time of the model run this request was part of.")
    probabilities: dict[str, float] | None = Field(
        default=None, description="Every intent's probability; only with return_all_probs."
    )
    labels: list[LabelScore] | None = Field(
        default=None,
        description="Multi-label models: every label at or above model.output.threshold, highest first.",
    )
    abstained: bool | None = Field(
        default=None,
        description="Present and true when the confidence is below model.output.abstain_threshold: "
        "intent_id is -1 and intent_name the fallback label; best_guess holds the model's best.",
    )
    best_guess: Intent | None = None
    timing: Timing


class BatchPredictResponse(BaseModel):
    results: list[PredictResponse]


class IntentsResponse(BaseModel):
    intents: list[Intent]


class ServiceStatus(BaseModel):
    status: str = Field(examples=["ok"])
    service: str
    version: str = Field(description="batcher's version (`batcher --version`).")
    model_loaded: bool
    model: str
    provider: str
    ready: bool
    draining: bool


class ModelInfo(BaseModel):
    name: str
    version: str | None = Field(default=None, description="The bundle's content hash; absent while loading.")
    labels: list[str] | None = None
    ready: bool
    provider: str | None = None
    file: str | None = Field(default=None, description="The graph file served.")


class ModelsResponse(BaseModel):
    default: str = Field(description="The model /predict, /predict/batch and /intents serve.")
    models: list[ModelInfo]


class ReloadResponse(BaseModel):
    model: str
    status: str = Field(description="reloaded, unchanged (same content hash) or failed.", examples=["reloaded"])
    version: str = Field(description="The version serving after the reload.")
    previous: str | None = None
    workers: str | None = None


class InferTensor(BaseModel):
    """One input tensor of the Open Inference Protocol: here `text`, BYTES, [N] or [N, 1]."""

    model_config = ConfigDict(extra="allow")

    name: Literal["text"]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=2, examples=[[1]])]
    datatype: Literal["BYTES"]
    data: list[Any] | None = Field(default=None, examples=[["播放周杰伦的歌"]])
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    inputs: Annotated[list[InferTensor], Field(min_length=1, max_length=1)]
    outputs: list[dict[str, Any]] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class OIPServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OIPLive(BaseModel):
    live: bool


class OIPReady(BaseModel):
    ready: bool


class OIPModelReady(BaseModel):
    name: str
    ready: bool


class OIPTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OIPModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OIPTensorMetadata]
    outputs: list[OIPTensorMetadata]


class OIPError(BaseModel):
    error: str = Field(description="The Open Inference Protocol's error shape: type and message.")


class Probe(BaseModel):
    status: str = Field(examples=["ok", "not_ready"])


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable error type.", examples=["validation_error"])
    message: str = Field(description="Human-readable explanation naming the field at fault.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def validate(model: type[M], data: Any) -> M:
    """Validate parsed JSON, turning pydantic's errors into one 422 naming the field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationFailed(_describe(exc)) from None


def _describe(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}"
