"""Text to token ids with Hugging Face `tokenizers`: a bundle's `tokenizer.json`, or the
`vocab.txt` a BERT/TinyBERT checkpoint ships. Sequences are not padded here (the batcher
pads each batch to its own longest row) and are truncated from the left, keeping the
end of the dialogue.

In serving, a request's turns become its `Text` on the event loop: the one string the
model reads, tokenized there (`batching.tokenize_on = "loop"`; ~2 µs through the exact
`Shortcut` for a BERT vocabulary, against ~20 µs in the tokenizer) or left for the worker
thread to tokenize with its whole batch in one `encode_batch` call, which releases the GIL
(`"worker"`). The
tokenizer's own thread pool is off (TOKENIZERS_PARALLELISM=false unless set): the worker
threads are already one per core."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from batcher.dialogue import SEPARATOR, char_budget, dialogue_text
from batcher.errors import BundleError, ValidationFailed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SPECIAL_TOKENS = 2
"""[CLS] and [SEP] around a single sequence (BERT's template)."""
UNREADABLE = "turns: no turn has text the model can read"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized request, unpadded."""

    ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Text:
    """One request's dialogue text as the model reads it, with its token ids when it was
    tokenized on the loop. `length` is the token count for the batch policy: exact when
    tokenized, else a bound: a character is at most one token for a BERT WordPiece
    vocabulary (a Chinese character is one, a Latin word one or more pieces of at least
    one character; [SEP] is one), plus the special tokens, at most max_seq_len."""

    text: str
    length: int
    encoded: Encoded | None = None

    def __len__(self) -> int:
        return self.length


_ASCII_WORD = re.compile(r"[0-9A-Za-z]+|[^0-9A-Za-z]")
_WORDS_KEPT = 65536
# The pipeline Shortcut reproduces: BERT's (what tokenizer.json or vocab.txt bundles give).
_BERT_PIPELINE = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece"}


class Shortcut:
    """The same token ids as the tokenizer's `encode`, for the texts nearly every request
    carries, at a tenth of its cost (~2 µs against ~20 for a short Chinese utterance:
    Hugging Face's BERT normalizer and pre-tokenizer cost far more than the lookups).

    Exact by construction, never by approximation: a character goes through the table only
    if the tokenizer itself, asked at load time, makes it a token of its own whatever its
    neighbours (a CJK character, punctuation), and a run of ASCII letters and digits is one
    WordPiece word whose pieces the tokenizer gave on first sight (kept, up to 65,536
    words). A text with any other character, or a `[` that could spell an added token,
    gets None and the caller asks the tokenizer. `tests/test_tokenization.py` compares the
    two on the corpus and on random text."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy that never truncates a word
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        separator = tokenizer.token_to_id(SEPARATOR)
        assert separator is not None  # for_tokenizer checked
        self.separator: int = separator
        framed = tokenizer.encode("a")
        bare = tokenizer.encode("a", add_special_tokens=False).ids
        self.prefix = framed.ids[: framed.ids.index(bare[0])] if bare else []
        self.suffix = framed.ids[len(self.prefix) + len(bare) :]
        self.room = max_seq_len - len(self.prefix) - len(self.suffix)
        candidates = sorted({token for token in tokenizer.get_vocab() if len(token) == 1} - set("[0123456789"))
        alone = tokenizer.encode_batch(candidates, add_special_tokens=False)
        contexts = [
            (
                tokenizer.encode(word, add_special_tokens=False).ids,
                tokenizer.encode_batch([f"{word}{c}{word}" for c in candidates], add_special_tokens=False),
            )
            for word in ("a", "1")
        ]
        self.solo: dict[str, int] = {}
        for index, c in enumerate(candidates):
            ids = alone[index].ids
            if len(ids) == 1 and all(around[index].ids == [*word, ids[0], *word] for word, around in contexts):
                self.solo[c] = ids[0]
        self.words: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, max_seq_len: int) -> Shortcut | None:
        """A shortcut for a BERT pipeline; None for any other (the tokenizer does it all)."""
        config = json.loads(tokenizer.to_str())
        for part, kind in _BERT_PIPELINE.items():
            if (config.get(part) or {}).get("type") != kind:
                return None
        if tokenizer.token_to_id(SEPARATOR) is None or any(tokenizer.encode("a").type_ids):
            return None
        return cls(tokenizer, max_seq_len)

    def ids(self, text: str) -> list[int] | None:
        """The token ids, framed and truncated from the left as the tokenizer does; None when
        the text needs the tokenizer."""
        solo = self.solo
        ids: list[int] = list(self.prefix)
        for number, piece in enumerate(text.split(SEPARATOR)):
            if number:
                ids.append(self.separator)
            try:
                ids += [solo[c] for c in piece]  # the common case: CJK and punctuation only
            except KeyError:
                if not self._mixed(piece, ids):
                    return None
        body = len(ids) - len(self.prefix)
        if body > self.room:
            del ids[len(self.prefix) : len(ids) - self.room]
        ids += self.suffix
        return ids

    def _mixed(self, piece: str, ids: list[int]) -> bool:
        solo, words = self.solo, self.words
        for token in _ASCII_WORD.findall(piece):
            found = solo.get(token)
            if found is not None:
                ids.append(found)
            elif token == " ":
                continue
            elif token[0].isascii() and token[0].isalnum():
                pieces = words.get(token)
                if pieces is None:
                    pieces = self._tokenizer.encode(token, add_special_tokens=False).ids
                    if len(words) < _WORDS_KEPT:
                        words[token] = pieces
                ids += pieces
            else:
                return False
        return True


class TextEncoder:
    """Tokenizes one dialogue text at a time (about 2 µs for a short utterance through the
    `Shortcut`, 20 through the tokenizer)."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_len, direction="left")
        if tokenizer.token_to_id(SEPARATOR) is None:
            raise BundleError(f"tokenizer has no {SEPARATOR} token, which the dialogue format needs")
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0
        self.shortcut = Shortcut.for_tokenizer(tokenizer, max_seq_len)

    @classmethod
    def from_bundle(cls, directory: Path, max_seq_len: int) -> TextEncoder:
        """Load `tokenizer.json`, else a BERT `vocab.txt`, from a model bundle."""
        tokenizer_json = directory / "tokenizer.json"
        vocab = directory / "vocab.txt"
        try:
            if tokenizer_json.is_file():
                return cls(Tokenizer.from_file(str(tokenizer_json)), max_seq_len)
            if vocab.is_file():
                # TinyBERT checkpoints are uncased Chinese BERT vocabularies.
                bert = BertWordPieceTokenizer(str(vocab), lowercase=True)
                return cls(bert._tokenizer, max_seq_len)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{directory}: cannot load the tokenizer: {exc}") from None
        raise BundleError(f"{directory}: neither tokenizer.json nor vocab.txt is present")

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, text: str) -> Encoded:
        if self.shortcut is not None:
            ids = self.shortcut.ids(text)
            if ids is not None:
                return Encoded(ids, [0] * len(ids))
        encoding = self._tokenizer.encode(text)
        return Encoded(encoding.ids, encoding.type_ids)

    def prepare(self, turns: Iterable[tuple[str, str]], *, tokenize: bool = True) -> Text:
        """`(speaker, text)` turns, oldest first, as the model reads them (see `batcher.dialogue`),
        tokenized unless `tokenize` is false (a worker thread will); 422 when the tokenizer
        leaves nothing to read (one that drops every character given)."""
        text = dialogue_text(turns, char_budget(self.max_seq_len))
        if tokenize:
            encoded = self.encode(text)
            if not encoded.ids:
                raise ValidationFailed(UNREADABLE)
            return Text(text, len(encoded), encoded)
        length = len(text) - (len(SEPARATOR) - 1) * text.count(SEPARATOR) + SPECIAL_TOKENS
        return Text(text, min(length, self.max_seq_len))

    def encode_batch(self, texts: Sequence[str]) -> list[Encoded]:
        """Token ids of every text, in one call that releases the GIL (a worker thread's
        share). A row comes back empty when the tokenizer dropped everything given."""
        return [Encoded(encoding.ids, encoding.type_ids) for encoding in self._tokenizer.encode_batch(list(texts))]

    def encode_dialogue(self, turns: Iterable[tuple[str, str]]) -> Encoded:
        """The token ids of a dialogue (training, evaluation, the benchmark's ceiling); 422
        when nothing is left to read."""
        encoded = self.prepare(turns).encoded
        assert encoded is not None
        return encoded
