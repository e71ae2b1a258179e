"""Build the bundled model's BERT-style tokenizer (tokenizer.json) with `tokenizers`.

CJK text is split into characters, Latin text is lower-cased and split into WordPiece
pieces. The vocabulary: special tokens, punctuation and digits, the most frequent Chinese
characters by jieba's dictionary (summed word frequencies; jieba ships it), every
character of the dataset, and the dataset's 400 commonest Latin words, whole.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import jieba
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = list("，。！？、；：“”‘’（）《》【】…—～·,.!?;:'\"()[]<>-_/+*&%$#@~=|")
DIGITS = [str(d) for d in range(10)]
COMMON_CHARS = 4750
LATIN_PIECES = 400
LATIN_WORD = re.compile(r"[a-z0-9]+")


def is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def jieba_character_ranking() -> list[str]:
    counts: Counter[str] = Counter()
    path = os.path.join(os.path.dirname(jieba.__file__), "dict.txt")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            word, freq, *_ = line.split()
            for char in word:
                if is_cjk(char):
                    counts[char] += int(freq)
    return [char for char, _ in counts.most_common()]


def dataset_texts(data_dir: Path) -> list[str]:
    texts = []
    for name in ("train", "dev", "test"):
        with (data_dir / f"{name}.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                texts += [turn["text"] for turn in json.loads(line)["turns"]]
    return texts


def latin_words(texts: Iterable[str]) -> list[str]:
    """The dataset's commonest Latin words (lower-cased; ties alphabetical), whole: any other
    Latin word falls back to letters and ##letters. Counted, not learned by a WordPiece
    trainer, whose choice among equally frequent merges varies from run to run."""
    counts = Counter(word for text in texts for word in LATIN_WORD.findall(text.lower()) if len(word) > 1)
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:LATIN_PIECES]]


def build_tokenizer(data_dir: Path) -> Tokenizer:
    texts = dataset_texts(data_dir)
    seen_chars = sorted({char for text in texts for char in text.lower() if is_cjk(char)})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab_list = [
        *SPECIALS,
        *PUNCTUATION,
        *DIGITS,
        *("##" + d for d in DIGITS),
        *letters,
        *("##" + c for c in letters),
        *jieba_character_ranking()[:COMMON_CHARS],
        *seen_chars,
        *latin_words(texts),
    ]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer
