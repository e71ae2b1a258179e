from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.errors import BundleError
from batcher.model.dialogue import char_budget, dialogue_text
from batcher.model.formats import TextEncoder
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


# The shortcut must give exactly the tokenizer's ids, or None (then the tokenizer is asked).
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "intent-zh"
SPLITS = Path(__file__).resolve().parent.parent / "data" / "intents"


def tokenizer_ids(encoder: TextEncoder, text: str) -> list[int]:
    return encoder.tokens.tokenizer_ids(text)


def test_the_shortcut_gives_the_tokenizers_ids_on_every_corpus_dialogue() -> None:
    encoder = TextEncoder.from_bundle(BUNDLED, 128)
    assert encoder.shortcut is not None
    checked = total = 0
    for split in ("train", "dev", "test"):
        for line in (SPLITS / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            turns = [(turn["speaker"], turn["text"]) for turn in json.loads(line)["turns"]]
            text = dialogue_text(turns, char_budget(128))
            ids = encoder.shortcut.ids(text)
            total += 1
            if ids is not None:
                assert ids == tokenizer_ids(encoder, text), text
                checked += 1
    assert checked > 0.99 * total  # nearly every dialogue takes the shortcut (all but 4 of 3,594)


@functools.cache
def cached_encoder(bundle: Path, max_seq_len: int) -> TextEncoder:
    return TextEncoder.from_bundle(bundle, max_seq_len)


# Characters of every kind the pipeline treats differently: CJK in and out of the vocabulary,
# ASCII letters (both cases) and digits, ASCII and full-width punctuation, brackets that
# could spell an added token, accented and combining characters, symbols, emoji, spaces
# and control characters, compatibility ideographs that normalise to others.
ALPHABET = (
    "播放周杰伦的歌明天北京天气你好吗闹钟点分导航去机场翻译成英文新闻打开空调"
    "aAbBzZHelo0123456789"
    " ,.!?:;'\"()-_/@#%&*+=<>~`^|{}"
    "，。！？：；、（）《》【】“”…—"
    "[]"
    "éÉüñçàÀ\u0301\u0308"
    "℃°½²①ＡＢ１２"
    "😀🎵\u200b\t\n\x00"
    "\uf900\uf901\u2f00"
    "龘鱻㐀𠀀"
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(
        st.one_of(st.text(alphabet=ALPHABET, max_size=40), st.sampled_from(["[SEP]", "[CLS]", "[sep]", "用户：", " "])),
        max_size=8,
    ),
    max_seq_len=st.sampled_from([8, 16, 128]),
    bundle=st.sampled_from(["bundled", "tiny"]),
)
def test_the_shortcut_gives_the_tokenizers_ids_or_none_on_any_text(
    pieces: list[str], max_seq_len: int, bundle: str, tiny_bundle: Path
) -> None:
    encoder = cached_encoder(BUNDLED if bundle == "bundled" else tiny_bundle, max_seq_len)
    assert encoder.shortcut is not None
    text = "".join(pieces)
    ids = encoder.shortcut.ids(text)
    if ids is not None:
        assert ids == tokenizer_ids(encoder, text)
    assert encoder.encode(text).ids == tokenizer_ids(encoder, text)


def test_long_ascii_words_and_truncation_match_the_tokenizer(tiny_bundle: Path) -> None:
    for max_seq_len in (4, 8, 128):
        encoder = TextEncoder.from_bundle(tiny_bundle, max_seq_len)
        for text in ("hello" * 30, "播放" + "hello" * 3 + "周杰伦", "a" * 101 + " 播放", "hello 播放 " * 40):
            assert encoder.encode(text).ids == tokenizer_ids(encoder, text), (max_seq_len, text)


def test_a_vocab_txt_tokenizer_takes_the_shortcut_too(tmp_path: Path) -> None:
    vocab = build_tokenizer().get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n", encoding="utf-8")
    encoder = TextEncoder.from_bundle(tmp_path, 32)
    assert encoder.shortcut is not None
    assert encoder.shortcut.ids("Hello 播放") == [vocab[t] for t in ("[CLS]", "hello", "播", "放", "[SEP]")]
