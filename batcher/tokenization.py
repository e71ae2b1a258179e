"""Text to token ids with Hugging Face `tokenizers`: a bundle's `tokenizer.json`, or the
`vocab.txt` a BERT/TinyBERT checkpoint ships. Sequences are not padded here (the batcher
pads each batch to its own longest row) and are truncated from the left, keeping the
end of the dialogue.

In serving, a request's turns become its `Text` on the event loop: the one string the
model reads, tokenized there (`batching.tokenize_on = "loop"`) or left for the worker
thread to tokenize with its whole batch in one `encode_batch` call, which releases the GIL
(`"worker"`), so the loop does not spend the ~20 µs a text costs the tokenizer. The
tokenizer's own thread pool is off (TOKENIZERS_PARALLELISM=false unless set): the worker
threads are already one per core."""

from __future__ import annotations

import os
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


class TextEncoder:
    """Tokenizes one dialogue text at a time (about 10 µs for a short utterance)."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_len, direction="left")
        if tokenizer.token_to_id(SEPARATOR) is None:
            raise BundleError(f"tokenizer has no {SEPARATOR} token, which the dialogue format needs")
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0

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
