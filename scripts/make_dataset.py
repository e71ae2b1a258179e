"""Write data/intents/{train,dev,test}.jsonl and the data card from scripts/dataset_phrases.py.

Deterministic (fixed seed): every example is a hand-written template filled with
hand-written slot values, then varied the way people type (polite or terse wrappers,
homophone typos, traditional characters). Splits are drawn per intent; duplicates are
removed across the whole set before splitting, so no test dialogue appears in train.
The second wave of templates (BROADER) is drawn after the first with its own seed, so
the first wave's examples are the same as before it was written.

    python scripts/make_dataset.py [--out data/intents] [--seed 13]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_phrases import (
    BROADER,
    BROADER_PER_INTENT,
    BROADER_SLOTS,
    DIALOGUES,
    HOMOPHONES,
    INTENTS,
    NEGATED,
    PREFIXES,
    SINGLE,
    SLOTS,
    SUFFIXES,
    TRADITIONAL,
)

SINGLE_PER_INTENT = 140
NEGATED_PER_INTENT = 12
DIALOGUES_PER_INTENT = 52
SPLITS = {"test": 0.15, "dev": 0.10}
ALL_SLOTS = {**SLOTS, **BROADER_SLOTS}
Turn = tuple[str, str]


def fill(template: str, rng: random.Random, chosen: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        slot = match.group(1)
        if slot not in chosen:
            chosen[slot] = rng.choice(ALL_SLOTS[slot])
        return chosen[slot]

    return re.sub(r"\{(\w+)\}", value, template)


def vary(text: str, rng: random.Random) -> str:
    """Surface variation of one user utterance."""
    if rng.random() < 0.45:
        text = rng.choice(PREFIXES) + text + rng.choice(SUFFIXES)
    if rng.random() < 0.12:
        candidates = [word for word in HOMOPHONES if word in text]
        if candidates:
            word = rng.choice(candidates)
            text = text.replace(word, HOMOPHONES[word], 1)
    if rng.random() < 0.07:
        text = text.translate(TRADITIONAL)
    if rng.random() < 0.05:
        text = text.replace("，", " ").replace("？", "?")
    return text.strip()


def single(template: str, rng: random.Random) -> list[Turn]:
    return [("user", vary(fill(template, rng, {}), rng))]


def dialogue(script: list[Turn], rng: random.Random) -> list[Turn]:
    chosen: dict[str, str] = {}
    turns = []
    for speaker, template in script:
        text = fill(template, rng, chosen)
        turns.append((speaker, vary(text, rng) if speaker == "user" else text))
    return turns


def generate(intent: str, rng: random.Random, seen: set[tuple[Turn, ...]], wave: int = 1) -> list[list[Turn]]:
    made: list[list[Turn]] = []

    def take(pool: list[str] | list[list[Turn]], count: int, build: object) -> None:
        for _ in range(count * 60):
            if count == 0:
                return
            example = build(rng.choice(pool), rng)  # type: ignore[operator]
            key = tuple(example)
            if key in seen:
                continue
            seen.add(key)
            made.append(example)
            count -= 1
        raise SystemExit(f"{intent}: could not make enough unique examples from {len(pool)} templates")

    if wave == 1:
        take(SINGLE[intent], SINGLE_PER_INTENT, single)
        take(NEGATED[intent], NEGATED_PER_INTENT, single)
        take(DIALOGUES[intent], DIALOGUES_PER_INTENT, dialogue)
    else:
        take(BROADER[intent], BROADER_PER_INTENT[intent], single)
    return made


def split(examples: list[dict[str, object]], rng: random.Random) -> dict[str, list[dict[str, object]]]:
    rng.shuffle(examples)
    sizes = {name: round(len(examples) * share) for name, share in SPLITS.items()}
    test = examples[: sizes["test"]]
    dev = examples[sizes["test"] : sizes["test"] + sizes["dev"]]
    return {"train": examples[sizes["test"] + sizes["dev"] :], "dev": dev, "test": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/intents"), help="output directory")
    parser.add_argument("--seed", type=int, default=13, help="random seed")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[tuple[Turn, ...]] = set()
    splits: dict[str, list[dict[str, object]]] = {"train": [], "dev": [], "test": []}
    for intent in INTENTS:
        examples = [
            {"turns": [{"speaker": s, "text": t} for s, t in turns], "intent": intent}
            for turns in generate(intent, rng, seen)
        ]
        for name, part in split(examples, rng).items():
            splits[name] += part
    second = random.Random(args.seed + 1)
    for intent in INTENTS:
        examples = [
            {"turns": [{"speaker": s, "text": t} for s, t in turns], "intent": intent}
            for turns in generate(intent, second, seen, wave=2)
        ]
        for name, part in split(examples, second).items():
            splits[name] += part
    # Single-turn test utterances must not appear anywhere in train either.
    train_texts = {turn["text"] for example in splits["train"] for turn in example["turns"]}  # type: ignore[attr-defined]
    splits["test"] = [
        e
        for e in splits["test"]
        if len(e["turns"]) > 1 or e["turns"][0]["text"] not in train_texts  # type: ignore[arg-type,index]
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        rng.shuffle(examples)
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for example in examples:
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    write_card(args.out, splits, args.seed)
    print(" ".join(f"{name}={len(examples)}" for name, examples in splits.items()))


def write_card(out: Path, splits: dict[str, list[dict[str, object]]], seed: int) -> None:
    def key(example: dict[str, object]) -> tuple[tuple[str, str], ...]:
        return tuple((t["speaker"], t["text"]) for t in example["turns"])  # type: ignore[attr-defined]

    train_keys = {key(e) for e in splits["train"]}
    train_texts = {t["text"] for e in splits["train"] for t in e["turns"]}  # type: ignore[attr-defined]
    leaked_dialogues = sum(key(e) in train_keys for e in splits["test"])
    leaked_single = sum(
        len(e["turns"]) == 1 and e["turns"][0]["text"] in train_texts
        for e in splits["test"]  # type: ignore[arg-type,index]
    )
    rows = []
    for intent in INTENTS:
        counts = [sum(e["intent"] == intent for e in splits[name]) for name in ("train", "dev", "test")]
        multi = sum(e["intent"] == intent and len(e["turns"]) > 1 for name in splits for e in splits[name])  # type: ignore[arg-type]
        rows.append(f"| {intent} | {counts[0]} | {counts[1]} | {counts[2]} | {sum(counts)} | {multi} |")
    total = {name: len(examples) for name, examples in splits.items()}
    multi_total = sum(len(e["turns"]) > 1 for name in splits for e in splits[name])  # type: ignore[arg-type]
    all_count = sum(total.values())
    lengths = Counter(len(e["turns"]) for name in splits for e in splits[name])  # type: ignore[arg-type]
    text = f"""# Chinese dialogue intents: data card

Written for batcher's bundled model (`models/intent-zh/`). Regenerate with
`python scripts/make_dataset.py` (seed {seed}); the files here are its output.

## How it was written

Every example comes from hand-written material in `scripts/dataset_phrases.py`:
templates for what users type or say to a voice assistant in each of the 12 intents,
hand-written slot values (cities, days, clock times in several forms, singers, songs,
dishes, devices, apps and faults, …), near-miss utterances that name one intent and ask
for another (“不是闹钟，{{day}}提醒我{{event}}”), and short dialogues whose last user
turn is ambiguous alone (“那后天呢”, “换一首”, “再调暗一点”, “取消吧”): the same final turn
appears under several intents, so the label depends on the context. User turns are
varied at random: polite or terse wrappers (请问…吧, 小助手，…, …pls), homophone typos
(天器, 闹中, 拨放, 咋), traditional characters (天氣, 鬧鐘), a little English and pinyin
(play, navigate to, tianqi, daohang, nihao).

A second wave of templates (`BROADER` in the phrase book, drawn after the first with
seed {seed} + 1, so the first wave's examples did not change) adds phrasings the first
lacked, written after reading where the model failed on real users' utterances (their
per-intent error counts only; no real utterance is copied here or trained on): chit-chat
above all (questions about the assistant, small talk, life and general-knowledge
questions, jokes, insults, feelings), places asked about ("X在哪", "多远"), music asked
for by a title or a singer alone, and terse, spoken, unpunctuated forms of every intent.

This is template-composed data, not logged user traffic: test shares templates (not
examples) with train, so test accuracy says how well the model learned this material,
and real traffic with unseen phrasings will score lower.

## Counts

{all_count} examples; {multi_total} ({multi_total / all_count:.0%}) are multi-turn dialogues
(turns per example: {dict(sorted(lengths.items()))}).

| intent | train | dev | test | total | multi-turn |
|---|---|---|---|---|---|
{chr(10).join(rows)}
| **all** | {total["train"]} | {total["dev"]} | {total["test"]} | {all_count} | {multi_total} |

## Separation of splits

Duplicates are removed across the whole set before splitting, and single-turn test
examples whose text appears anywhere in train are dropped. Checked when this card was
written: test dialogues found verbatim in train: **{leaked_dialogues}**; single-turn
test utterances found in train: **{leaked_single}**. `test` is used only by
`make evaluate`, never for training or for choosing hyper-parameters (early stopping
uses `dev`).

## Format

One JSON object a line: `{{"turns":[{{"speaker":"user","text":"…"}}, …],"intent":"…"}}`,
oldest turn first, as `POST /predict` receives it.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
