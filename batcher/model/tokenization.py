"""Text to token ids with Hugging Face `tokenizers`: a bundle's `tokenizer.json`, or the
`vocab.txt` a BERT checkpoint ships, with the conventions `transformers` reads beside them
(`tokenizer_config.json`, `special_tokens_map.json`: do_lower_case, the separator, class
and pad tokens). Sequences are not padded here (the worker pads each batch to its own
longest row) and are cut at the model's maximum length, at the side its format says.

In serving, a request becomes its `Text` on the event loop, tokenized there
(`batching.tokenize_on = "loop"`; ~2 µs through the exact `Shortcut` for a BERT
vocabulary, against ~20 µs in the tokenizer) or left for the worker thread to tokenize
with its whole batch in one `encode_batch` call, which releases the GIL (`"worker"`). The
tokenizer's own thread pool is off (TOKENIZERS_PARALLELISM=false unless set): the worker
threads are already one per core."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer
from tokenizers import normalizers as hf_normalizers
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from batcher.errors import BundleError, PayloadTooLarge

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
Side = Literal["right", "left"]
UNREADABLE = "turns: no turn has text the model can read"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input, unpadded."""

    ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> tuple[int, ...]:
        """What the model reads of it: equal keys, equal answers (the cache's key)."""
        if any(self.type_ids):
            return (*self.ids, -1, *self.type_ids)
        return tuple(self.ids)


@dataclass(frozen=True, slots=True)
class Text:
    """One input as the model reads it: the text (and the pair's second text), with its
    token ids when it was tokenized on the loop. `length` is the token count for the batch
    policy: exact when tokenized, else a bound (`Tokens.bound`)."""

    text: str
    length: int
    encoded: Encoded | None = None
    pair: str | None = None

    def __len__(self) -> int:
        return self.length

    @property
    def key(self) -> object:
        """The cache's key: the token ids when known, else the texts."""
        return self.encoded.key if self.encoded is not None else (self.text, self.pair)


@dataclass(frozen=True)
class SpecialTokens:
    """The tokens `transformers` would use for this tokenizer (None: it has none)."""

    cls: str | None
    sep: str | None
    pad: str | None
    unk: str | None
    pad_id: int


_ASCII_WORD = re.compile(r"[0-9A-Za-z]+|[^0-9A-Za-z]")
_WORDS_KEPT = 65536
# The pipeline Shortcut reproduces: BERT's (what tokenizer.json or vocab.txt bundles give).
_BERT_PIPELINE = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece"}


class Shortcut:
    """The same token ids as the tokenizer's `encode` of one text, for the texts nearly every
    request carries, at a tenth of its cost (~2 µs against ~20 for a short Chinese
    utterance: Hugging Face's BERT normalizer and pre-tokenizer cost far more than the
    lookups).

    Exact by construction, never by approximation: a character goes through the table only
    if the tokenizer itself, asked at load time, makes it a token of its own whatever its
    neighbours (a CJK character, punctuation), and a run of ASCII letters and digits is one
    WordPiece word whose pieces the tokenizer gave on first sight (kept, up to 65,536
    words). The separator token's spelling is the token. A text with any other character,
    or a `[` that could spell another added token, gets None and the caller asks the
    tokenizer. `tests/test_tokenization.py` compares the two on the corpus and on random
    text."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, separator: str, side: Side) -> None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy that never truncates a word
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        separator_id = tokenizer.token_to_id(separator)
        assert separator_id is not None  # for_tokenizer checked
        self.separator_text = separator
        self.separator: int = separator_id
        self.side = side
        framed = tokenizer.encode("a")
        bare = tokenizer.encode("a", add_special_tokens=False).ids
        self.prefix = framed.ids[: framed.ids.index(bare[0])] if bare else []
        self.suffix = framed.ids[len(self.prefix) + len(bare) :]
        self.room = max_length - len(self.prefix) - len(self.suffix)
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
    def for_tokenizer(cls, tokenizer: Tokenizer, max_length: int, separator: str | None, side: Side) -> Shortcut | None:
        """A shortcut for a BERT pipeline; None for any other (the tokenizer does it all)."""
        if not is_bert_pipeline(tokenizer) or separator is None or tokenizer.token_to_id(separator) is None:
            return None
        if not separator.startswith("[") or any(tokenizer.encode("a").type_ids):
            return None
        return cls(tokenizer, max_length, separator, side)

    def ids(self, text: str) -> list[int] | None:
        """The token ids, framed and truncated as the tokenizer does; None when the text needs
        the tokenizer."""
        solo = self.solo
        ids: list[int] = list(self.prefix)
        for number, piece in enumerate(text.split(self.separator_text)):
            if number:
                ids.append(self.separator)
            try:
                ids += [solo[c] for c in piece]  # the common case: CJK and punctuation only
            except KeyError:
                if not self._mixed(piece, ids):
                    return None
        body = len(ids) - len(self.prefix)
        if body > self.room:
            if self.side == "left":
                del ids[len(self.prefix) : len(ids) - self.room]
            else:
                del ids[len(self.prefix) + self.room :]
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


def is_bert_pipeline(tokenizer: Tokenizer) -> bool:
    config = json.loads(tokenizer.to_str())
    return all((config.get(part) or {}).get("type") == kind for part, kind in _BERT_PIPELINE.items())


class Tokens:
    """A bundle's tokenizer, configured as `transformers` configures it: truncation at the
    model's maximum length (longest first for pairs), no padding. `encode` takes one text or
    a pair; `side` and `truncate` may differ per request."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        specials: SpecialTokens,
        *,
        max_length: int,
        side: Side,
        separator: str | None = None,
    ) -> None:
        tokenizer.no_padding()
        self._tokenizers: dict[Side, Tokenizer] = {}
        self._base = tokenizer
        self.specials = specials
        self.max_length = max_length
        self.side: Side = side
        self.pad_id = specials.pad_id
        self.bert = is_bert_pipeline(tokenizer)
        processor = tokenizer.post_processor
        self.special_count = (
            (processor.num_special_tokens_to_add(False), processor.num_special_tokens_to_add(True))
            if processor is not None
            else (0, 0)
        )
        self.shortcut = Shortcut.for_tokenizer(tokenizer, max_length, separator or specials.sep, side)

    def _truncating(self, side: Side) -> Tokenizer:
        tokenizer = self._tokenizers.get(side)
        if tokenizer is None:
            tokenizer = Tokenizer.from_str(self._base.to_str())
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=self.max_length, strategy="longest_first", direction=side)
            self._tokenizers[side] = tokenizer
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._base.get_vocab_size(with_added_tokens=True))

    def token(self, index: int) -> str:
        """The token an id stands for (what `batcher check` shows)."""
        return self._base.id_to_token(index) or f"<{index}>"

    def token_id(self, token: str) -> int | None:
        found = self._base.token_to_id(token)
        return None if found is None else int(found)

    def encode(self, text: str, pair: str | None = None, *, side: Side | None = None, truncate: bool = True) -> Encoded:
        """Token ids of one text or a pair: 413 when `truncate` is false and it is too long."""
        side = side or self.side
        if pair is None and side == self.side and self.shortcut is not None and truncate:
            ids = self.shortcut.ids(text)
            if ids is not None:
                return Encoded(ids, [0] * len(ids))
        if not truncate:
            whole = self._base.encode(text, pair)
            if len(whole.ids) > self.max_length:
                raise PayloadTooLarge(
                    f"input is {len(whole.ids)} tokens, more than the model's {self.max_length}; "
                    "send truncate: true to have it cut"
                )
            return Encoded(whole.ids, whole.type_ids)
        encoding = self._truncating(side).encode(text, pair)
        return Encoded(encoding.ids, encoding.type_ids)

    def tokenizer_ids(self, text: str, pair: str | None = None, side: Side | None = None) -> list[int]:
        """The ids the tokenizer itself gives, never the shortcut (tests compare the two)."""
        return list(self._truncating(side or self.side).encode(text, pair).ids)

    def encode_batch(self, rows: Sequence[Text]) -> list[Encoded]:
        """Token ids of every row, in one call that releases the GIL (a worker thread's share),
        cut at this tokenizer's side. A row comes back empty when the tokenizer dropped
        everything given."""
        inputs: list[Any] = [row.text if row.pair is None else (row.text, row.pair) for row in rows]
        encodings = self._truncating(self.side).encode_batch(inputs)
        return [Encoded(encoding.ids, encoding.type_ids) for encoding in encodings]

    def bound(self, text: str, pair: str | None = None) -> int:
        """At most how many tokens a text (or pair) becomes, without tokenizing it: a character
        is at most one token for a BERT WordPiece vocabulary (a Chinese character is one, a
        Latin word one or more pieces of at least one character), a byte at most one for
        any other; plus the special tokens; at most max_length."""
        measure = len if self.bert else _utf8_length
        body = measure(text) + (measure(pair) if pair is not None else 0)
        return min(body + self.special_count[pair is not None], self.max_length)


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def load_tokenizer(directory: Path, config: dict[str, Any]) -> tuple[Tokenizer, SpecialTokens]:
    """A bundle's tokenizer as `transformers` would load it: `tokenizer.json`, with
    tokenizer_config.json's (`config`) do_lower_case applied to a BERT normalizer; else
    `vocab.txt` as a BERT WordPiece tokenizer honouring do_lower_case (default true, as
    BertTokenizer's)."""
    tokenizer_json = directory / "tokenizer.json"
    vocab = directory / "vocab.txt"
    try:
        if tokenizer_json.is_file():
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
            _apply_bert_options(tokenizer, config)
        elif vocab.is_file():
            tokens = {name: _token(config, f"{name}_token") for name in ("unk", "sep", "cls", "pad", "mask")}
            defaults = {"unk": "[UNK]", "sep": "[SEP]", "cls": "[CLS]", "pad": "[PAD]", "mask": "[MASK]"}
            chosen = {name: tokens[name] or defaults[name] for name in defaults}
            bert = BertWordPieceTokenizer(
                str(vocab),
                unk_token=chosen["unk"],
                sep_token=chosen["sep"],
                cls_token=chosen["cls"],
                pad_token=chosen["pad"],
                mask_token=chosen["mask"],
                lowercase=bool(config.get("do_lower_case", True)),
                strip_accents=config.get("strip_accents"),
                handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            )
            tokenizer = bert._tokenizer
        else:
            others = [name for name in ("sentencepiece.bpe.model", "spiece.model") if (directory / name).is_file()]
            hint = (
                f"; it has {others[0]} (a slow tokenizer): save the tokenizer with a fast tokenizer class to get "
                "tokenizer.json"
                if others
                else ""
            )
            raise BundleError(f"{directory}: neither tokenizer.json nor vocab.txt is present{hint}")
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"{directory}: cannot load the tokenizer: {exc}") from None
    return tokenizer, special_tokens(tokenizer, config)


def _apply_bert_options(tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """transformers' BertTokenizerFast rebuilds a BERT normalizer whose lowercase,
    strip_accents or handle_chinese_chars disagree with tokenizer_config.json."""
    if "do_lower_case" not in config or tokenizer.normalizer is None:
        return
    state = json.loads(tokenizer.to_str()).get("normalizer") or {}
    if state.get("type") != "BertNormalizer":
        return
    lowercase = bool(config["do_lower_case"])
    strip_accents = config.get("strip_accents", state.get("strip_accents"))
    chinese = bool(config.get("tokenize_chinese_chars", state.get("handle_chinese_chars", True)))
    if (state.get("lowercase"), state.get("strip_accents"), state.get("handle_chinese_chars")) == (
        lowercase,
        strip_accents,
        chinese,
    ):
        return
    tokenizer.normalizer = hf_normalizers.BertNormalizer(
        clean_text=bool(state.get("clean_text", True)),
        handle_chinese_chars=chinese,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )


def _token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens(tokenizer: Tokenizer, config: dict[str, Any]) -> SpecialTokens:
    """The class, separator, pad and unknown tokens: as tokenizer_config.json and
    special_tokens_map.json name them, else the usual spellings the vocabulary has."""
    usual = {
        "cls": ("[CLS]", "<s>", "<cls>"),
        "sep": ("[SEP]", "</s>", "<sep>"),
        "pad": ("[PAD]", "<pad>"),
        "unk": ("[UNK]", "<unk>"),
    }
    found: dict[str, str | None] = {}
    for name, spellings in usual.items():
        named = _token(config, f"{name}_token")
        if named is not None and tokenizer.token_to_id(named) is not None:
            found[name] = named
        else:
            found[name] = next((s for s in spellings if tokenizer.token_to_id(s) is not None), None)
    pad_id = tokenizer.token_to_id(found["pad"]) if found["pad"] else None
    if pad_id is None and tokenizer.padding is not None:
        pad_id = tokenizer.padding.get("pad_id")
    return SpecialTokens(found["cls"], found["sep"], found["pad"], found["unk"], int(pad_id or 0))
