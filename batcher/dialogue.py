"""How dialogue turns become the one text the model reads.

The single source of truth for both serving and training: `scripts/train.py` imports
`dialogue_text`, so the model is trained on exactly the text the server builds.
Turns are joined oldest first, each prefixed by a speaker marker, separated by [SEP];
over-long dialogues keep their end (the most recent turns, and the last turn whole
when it fits), because the intent lives in the latest user turn.
"""

from __future__ import annotations

from collections.abc import Iterable

SEPARATOR = "[SEP]"
USER_MARKER = "用户："
OTHER_MARKER = "助手："
# Characters of dialogue kept before tokenizing, per token of max_seq_len: comfortably more
# than the tokens need, so truncation happens in the tokenizer, yet a 1 MiB body never
# reaches it whole.
CHARS_PER_TOKEN = 4


def char_budget(max_seq_len: int) -> int:
    """Characters of dialogue text kept for a model reading at most `max_seq_len` tokens."""
    return max_seq_len * CHARS_PER_TOKEN


def speaker_marker(speaker: str) -> str:
    """`user` speaks as the user; every other speaker (assistant, bot, system) as the assistant."""
    return USER_MARKER if speaker.strip().lower() == "user" else OTHER_MARKER


def dialogue_text(turns: Iterable[tuple[str, str]], max_chars: int) -> str:
    """Join `(speaker, text)` turns into model text of at most `max_chars` characters,
    dropping blank turns and cutting from the start when too long."""
    pieces = [speaker_marker(speaker) + " ".join(text.split()) for speaker, text in turns if text.strip()]
    kept: list[str] = []
    budget = max_chars
    for piece in reversed(pieces):
        cost = len(piece) + (len(SEPARATOR) if kept else 0)
        if cost > budget:
            room = budget - (len(SEPARATOR) if kept else 0)
            if room > 0:
                kept.append(piece[-room:])
            break
        kept.append(piece)
        budget -= cost
    return SEPARATOR.join(reversed(kept))
