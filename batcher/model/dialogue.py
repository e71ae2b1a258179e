"""How dialogue turns become the one text a dialogue model reads (input format `dialogue`).

The single source of truth for both serving and training: `scripts/train.py` imports
`dialogue_text`, so the bundled model is trained on exactly the text the server builds.
Turns are joined oldest first, each prefixed by a speaker marker, separated by the
template's separator (the bundled model's: `用户：`, `助手：` and [SEP], declared in its
bundle's batcher.json); over-long dialogues keep their end (the most recent turns, and the
last turn whole when it fits), because the intent lives in the latest user turn.

"Blank" has one definition, used by the request schema and here: a text is blank when
nothing is left once whitespace (Python's and JSON Schema's) and invisible control and
format characters (zero-width spaces and joiners, direction marks, BOM) are taken out.
Text that spells the format's own markers (`[SEP]`, `用户：`) is neutralised, so a user
cannot forge a separator or a speaker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SEPARATOR = "[SEP]"
USER_MARKER = "用户："
OTHER_MARKER = "助手："
# Characters of dialogue kept before tokenizing, per token of max_seq_len: comfortably more
# than the tokens need, so truncation happens in the tokenizer, yet a long text never
# reaches it whole.
CHARS_PER_TOKEN = 4

# Character classes, written so that Python's `re` and ECMAScript (JSON Schema's `pattern`)
# read them alike. Whitespace becomes one space; invisible characters are dropped.
WHITESPACE = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
INVISIBLE = (
    r"\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\xad\u180e\u200b-\u200f\u202a-\u202e"
    r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffd"
)
VISIBLE = f"[^{WHITESPACE}{INVISIBLE}]"
"""One character that counts: a text without any is blank (the schema's pattern too)."""
_VISIBLE = re.compile(VISIBLE)
_INVISIBLE = re.compile(f"[{INVISIBLE}]+")
_WHITESPACE = re.compile(f"[{WHITESPACE}]+")
# Spellings of the format's own tokens and markers inside user text: brackets and the
# full-width colon are swapped for look-alikes the tokenizer reads as plain text.
_RESERVED = re.compile(r"\[(SEP|CLS|PAD|MASK|UNK)\]|(用户|助手)：", re.IGNORECASE)
# What any of the three rewrites needs to find (most texts have none: they are kept as given).
_TO_CLEAN = re.compile(f"[{WHITESPACE}{INVISIBLE}\\[：]")


def char_budget(max_seq_len: int) -> int:
    """Characters of dialogue text kept for a model reading at most `max_seq_len` tokens."""
    return max_seq_len * CHARS_PER_TOKEN


def is_blank(text: str) -> bool:
    return _VISIBLE.search(text) is None


def clean(text: str) -> str:
    """The text as the model reads it: invisible characters dropped, whitespace runs made
    one space, reserved spellings neutralised; "" when the text is blank."""
    if _TO_CLEAN.search(text) is None:
        return text
    text = _WHITESPACE.sub(" ", _INVISIBLE.sub("", text)).strip(" ")
    return _RESERVED.sub(_neutralise, text)


def _neutralise(match: re.Match[str]) -> str:
    token, speaker = match.groups()
    return f"({token})" if token else f"{speaker}:"


def is_user(speaker: str) -> bool:
    """`user` speaks as the user; every other speaker (assistant, bot, system) as the other side."""
    return speaker.strip().lower() == "user"


def speaker_marker(speaker: str) -> str:
    return USER_MARKER if is_user(speaker) else OTHER_MARKER


def last_user_text(turns: Iterable[tuple[str, str]]) -> str:
    """The text of the last user turn that is not blank (of the last such turn when no user
    speaks), as given."""
    last = ""
    for speaker, text in reversed(list(turns)):
        if is_blank(text):
            continue
        if is_user(speaker):
            return text
        last = last or text
    return last


def dialogue_text(
    turns: Iterable[tuple[str, str]],
    max_chars: int,
    *,
    user_marker: str = USER_MARKER,
    other_marker: str = OTHER_MARKER,
    separator: str = SEPARATOR,
    rewrite: bool = True,
    keep_end: bool = True,
) -> str:
    """Join `(speaker, text)` turns into model text of at most `max_chars` characters,
    dropping blank turns (each text `clean`ed when `rewrite`) and cutting from the start
    when too long (from the end unless `keep_end`). The defaults are the bundled model's
    template."""
    pieces = []
    for speaker, raw in turns:
        text = clean(raw) if rewrite else ("" if is_blank(raw) else raw)  # clean gives "" for blank
        if text:
            pieces.append((user_marker if is_user(speaker) else other_marker) + text)
    if not keep_end:
        return separator.join(pieces)[:max_chars]
    kept: list[str] = []
    budget = max_chars
    for piece in reversed(pieces):
        cost = len(piece) + (len(separator) if kept else 0)
        if cost > budget:
            room = budget - (len(separator) if kept else 0)
            if room > 0:
                kept.append(piece[-room:])
            break
        kept.append(piece)
        budget -= cost
    return separator.join(reversed(kept))
