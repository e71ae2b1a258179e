from __future__ import annotations

from pathlib import Path

import pytest

from batcher.errors import BundleError
from batcher.tokenization import TextEncoder
from tests.tiny_model import build_tokenizer


def test_encodes_cjk_as_characters_with_cls_and_sep(tiny_bundle: Path) -> None:
    encoder = TextEncoder.from_bundle(tiny_bundle, 64)
    encoded = encoder.encode("播放周杰伦的歌")
    assert len(encoded) == 7 + 2
    assert encoded.ids[0] == 2 and encoded.ids[-1] == 3  # [CLS] ... [SEP]
    assert encoded.type_ids == [0] * 9


def test_separator_in_text_is_the_special_token(tiny_bundle: Path) -> None:
    encoder = TextEncoder.from_bundle(tiny_bundle, 64)
    assert encoder.encode("我[SEP]你").ids.count(3) == 2


def test_truncation_keeps_the_end(tiny_bundle: Path) -> None:
    encoder = TextEncoder.from_bundle(tiny_bundle, 8)
    full = TextEncoder.from_bundle(tiny_bundle, 512).encode("一起去看风景好不好播放周杰伦的歌")
    short = encoder.encode("一起去看风景好不好播放周杰伦的歌")
    assert len(short) == 8
    assert short.ids[0] == full.ids[0]  # [CLS] survives
    assert short.ids[1:] == full.ids[-7:]  # the end of the dialogue survives


def test_bert_vocab_txt_is_accepted(tmp_path: Path) -> None:
    vocab = build_tokenizer().get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n", encoding="utf-8")
    encoder = TextEncoder.from_bundle(tmp_path, 32)
    assert encoder.encode("Hello 播放").ids == [vocab[t] for t in ("[CLS]", "hello", "播", "放", "[SEP]")]


def test_missing_tokenizer_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"neither tokenizer\.json nor vocab\.txt"):
        TextEncoder.from_bundle(tmp_path, 32)


def test_corrupt_tokenizer_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot load the tokenizer"):
        TextEncoder.from_bundle(tmp_path, 32)
