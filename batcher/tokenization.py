"""Text to token ids with Hugging Face `tokenizers`: a bundle's `tokenizer.json`, or the
`vocab.txt` a BERT/TinyBERT checkpoint ships. Sequences are not padded here (the batcher
pads each batch to its own longest row) and are truncated from the left, keeping the
end of the dialogue."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from batcher.dialogue import SEPARATOR, char_budget, dialogue_text
from batcher.errors import BundleError, ValidationFailed


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized request, unpadded."""

    ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


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

    def encode_dialogue(self, turns: Iterable[tuple[str, str]]) -> Encoded:
        """`(speaker, text)` turns, oldest first, as the model reads them (see `batcher.dialogue`);
        422 when nothing is left to read (a tokenizer that drops every character given)."""
        encoded = self.encode(dialogue_text(turns, char_budget(self.max_seq_len)))
        if not encoded.ids:
            raise ValidationFailed("turns: no turn has text the model can read")
        return encoded
