"""How a request becomes the model's input: its input format, declared, never assumed.

A model reads one `text` (a pair when a request sends one: the tokenizer's own pair
template, token type 1 for the second segment where the tokenizer gives it), a `pair`
(single texts refused), or a `dialogue` rendered by a template (which turns, a marker per
speaker role, a separator, which end is kept). The bundle declares its format in
`batcher.json`; `[model.input]` overrides it key by key; a bundle that declares nothing is
fed what `transformers`' text-classification pipeline is fed with `truncation=True` at
the model's maximum length: the text as given, cut at the right. A `text` model asked
with `turns` reads the last user turn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.config import InputKind, InputSettings, ModelSettings, Side, TurnsKept
from batcher.errors import ValidationFailed
from batcher.model.bundle import DECLARATION, ModelBundle, declared_settings, max_positions, read_configs
from batcher.model.dialogue import CHARS_PER_TOKEN, dialogue_text, last_user_text
from batcher.model.tokenization import UNREADABLE, Encoded, Text, Tokens, load_tokenizer

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 512
"""When neither the settings, the bundle's declaration, the tokenizer nor the model's
config says how long an input may be."""
_UNBOUNDED = 1_000_000
"""transformers writes model_max_length = 1e30 when it does not know: no length at all."""
PAIR_ONLY = "this model reads a pair of texts: send text and text_pair (or inputs: [a, b])"


@dataclass(frozen=True)
class InputFormat:
    """A model's input format, resolved (every key has its value and its source)."""

    kind: InputKind = "text"
    turns: TurnsKept = "last_user"
    user_marker: str = ""
    other_marker: str = ""
    separator: str = ""
    side: Side = "right"
    clean: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    max_length_from: str = "default"
    declared_by: str = "transformers' pipeline defaults"

    def describe(self) -> str:
        """One line for the start-up log and `batcher check`."""
        cut = f"at most {self.max_length} tokens ({self.max_length_from}), cut at the {self.side}"
        if self.kind == "dialogue":
            template = (
                f"{self.turns} turns, markers {self.user_marker!r}/{self.other_marker!r}, "
                f"separator {self.separator!r}{', cleaned' if self.clean else ''}"
            )
            return f"dialogue ({template}); {cut}; from {self.declared_by}"
        reads = "text pairs" if self.kind == "pair" else "one text (a pair when sent one)"
        return f"{self.kind}: {reads}, as given; {cut}; from {self.declared_by}"

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def resolve_input(
    settings: InputSettings,
    declared: dict[str, Any],
    *,
    max_length: int,
    max_length_from: str,
    separator: str | None,
) -> InputFormat:
    """The input format from [model.input] over the bundle's declaration over the defaults."""
    checked = declared_settings(declared, "input", settings)
    kind = checked.format or "text"
    dialogue = kind == "dialogue"
    tables = ((DECLARATION, declared.get("input", {})), ("[model.input]", settings))
    sources = [name for name, table in tables if _any_set(table)]
    return InputFormat(
        kind=kind,
        turns=checked.turns or ("all" if dialogue else "last_user"),
        user_marker=checked.user_marker or "",
        other_marker=checked.other_marker or "",
        separator=checked.separator if checked.separator is not None else (separator or " "),
        side=checked.truncation_side or ("left" if dialogue else "right"),
        clean=checked.clean if checked.clean is not None else dialogue,
        max_length=max_length,
        max_length_from=max_length_from,
        declared_by=" and ".join(sources) if sources else "transformers' pipeline defaults",
    )


def _any_set(table: object) -> bool:
    if isinstance(table, dict):
        return bool(table)
    return any(value is not None for value in dataclasses.asdict(table).values())  # type: ignore[call-overload]


def max_length(
    bundle_config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    declared: dict[str, Any],
    positions: int | None,
    max_seq_len: int,
) -> tuple[int, str]:
    """The longest input, and why: model.max_seq_len, else batcher.json's max_length, else
    the tokenizer's model_max_length, else the position table; capped by the position table
    (with a warning: longer inputs would fail in the graph)."""
    declared_length = _positive(declared.get("max_length"))
    tokenizer_length = _positive(tokenizer_config.get("model_max_length"))
    if max_seq_len:
        length, why = max_seq_len, "model.max_seq_len"
    elif declared_length:
        length, why = declared_length, f"{DECLARATION} max_length"
    elif tokenizer_length and tokenizer_length < _UNBOUNDED:
        length, why = tokenizer_length, "tokenizer_config.json model_max_length"
    elif positions:
        length, why = positions, "config.json max_position_embeddings"
    else:
        length, why = DEFAULT_MAX_LENGTH, "the default; the bundle names no length"
    if positions and length > positions:
        log.warning(
            "%s gives %d tokens but the model's position table (config.json max_position_embeddings) holds %d: "
            "inputs are cut at %d; set model.max_seq_len to silence this",
            why,
            length,
            positions,
            positions,
        )
        length, why = positions, f"{why}, capped by config.json max_position_embeddings"
    return length, why


def _positive(value: object) -> int | None:
    """A positive whole number of tokens, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
        return int(min(value, _UNBOUNDED))
    return None


class TextEncoder:
    """A model's reader: a request's turns, text or pair as the model reads them, in its
    input format, tokenized (`Tokens`) unless a worker thread will."""

    def __init__(self, tokens: Tokens, form: InputFormat) -> None:
        self.tokens = tokens
        self.format = form
        self.max_seq_len = form.max_length
        self.pad_id = tokens.pad_id
        self.shortcut = tokens.shortcut
        self._chars = form.max_length * CHARS_PER_TOKEN

    @classmethod
    def for_bundle(
        cls, bundle: ModelBundle, settings: ModelSettings, *, static_length: int | None = None
    ) -> TextEncoder:
        """The reader serving builds; `static_length`: the graph takes exactly that many tokens."""
        return cls._build(
            bundle.directory, bundle.config, bundle.tokenizer_config, bundle.declared,
            bundle.max_positions, settings.max_seq_len, settings.input, static_length,
        )  # fmt: skip

    @classmethod
    def from_bundle(cls, directory: Path, max_seq_len: int = 0) -> TextEncoder:
        """A bundle directory's reader with its declared format (training, evaluation, tests)."""
        config, tokenizer_config, declared = read_configs(directory)
        positions = max_positions(config)
        return cls._build(directory, config, tokenizer_config, declared, positions, max_seq_len, InputSettings())

    @classmethod
    def _build(
        cls,
        directory: Path,
        config: dict[str, Any],
        tokenizer_config: dict[str, Any],
        declared: dict[str, Any],
        positions: int | None,
        max_seq_len: int,
        settings: InputSettings,
        static_length: int | None = None,
    ) -> TextEncoder:
        tokenizer, specials = load_tokenizer(directory, tokenizer_config)
        length, why = max_length(config, tokenizer_config, declared, positions, max_seq_len)
        if static_length is not None and static_length < length:
            length, why = static_length, f"{why}, capped by the graph's static sequence length"
        form = resolve_input(settings, declared, max_length=length, max_length_from=why, separator=specials.sep)
        if form.kind == "dialogue" and form.separator and tokenizer.token_to_id(form.separator) is None:
            log.info("dialogue separator %r is not a token of this tokenizer: it is read as text", form.separator)
        return cls(Tokens(tokenizer, specials, max_length=length, side=form.side, separator=form.separator), form)

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    def dialogue(self, turns: Iterable[tuple[str, str]]) -> str:
        """The text a dialogue model reads for these turns."""
        form = self.format
        if form.turns == "last_user":
            turns = [("user", last_user_text(turns))]
        return dialogue_text(
            turns,
            self._chars,
            user_marker=form.user_marker,
            other_marker=form.other_marker,
            separator=form.separator,
            rewrite=form.clean,
            keep_end=form.side == "left",
        )

    def prepare(self, turns: Iterable[tuple[str, str]], *, tokenize: bool = True) -> Text:
        """`(speaker, text)` turns, oldest first, as the model reads them: the dialogue's text,
        or a text model's last user turn; 422 for a pair model or when nothing is left."""
        kind = self.format.kind
        if kind == "pair":
            raise ValidationFailed(PAIR_ONLY)
        text = self.dialogue(turns) if kind == "dialogue" else last_user_text(turns)
        return self._row(text, None, tokenize=tokenize)

    def prepare_text(
        self,
        text: str,
        pair: str | None = None,
        *,
        side: Side | None = None,
        truncate: bool = True,
        tokenize: bool = True,
    ) -> Text:
        """One text, or a pair (always encoded as a pair: it is one). A dialogue model reads a
        lone text as one user turn. `side` and `truncate` are a request's own (tokenized on
        the loop then, whatever batching.tokenize_on says)."""
        if pair is None:
            if self.format.kind == "pair":
                raise ValidationFailed(PAIR_ONLY)
            if self.format.kind == "dialogue":
                text = self.dialogue([("user", text)])
        own = (side is not None and side != self.format.side) or not truncate
        return self._row(text, pair, tokenize=tokenize or own, side=side, truncate=truncate)

    def _row(self, text: str, pair: str | None, *, tokenize: bool, side: Side | None = None,
             truncate: bool = True) -> Text:  # fmt: skip
        if not tokenize:
            return Text(text, self.tokens.bound(text, pair), None, pair)
        encoded = self.tokens.encode(text, pair, side=side, truncate=truncate)
        if not encoded.ids:
            raise ValidationFailed(UNREADABLE)
        return Text(text, len(encoded), encoded, pair)

    def encode(self, text: str) -> Encoded:
        """The token ids of text already in the model's format (training and evaluation)."""
        return self.tokens.encode(text)

    def encode_batch(self, rows: Sequence[Text]) -> list[Encoded]:
        """Token ids of every row in one call that releases the GIL (a worker thread's share)."""
        return self.tokens.encode_batch(rows)

    def encode_dialogue(self, turns: Iterable[tuple[str, str]]) -> Encoded:
        """The token ids of a dialogue (training, evaluation, the benchmark's ceiling); 422
        when nothing is left to read."""
        encoded = self.prepare(turns).encoded
        assert encoded is not None
        return encoded

    def settings_json(self) -> str:
        return json.dumps(self.format.as_dict(), sort_keys=True, ensure_ascii=False)
