from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batcher.dialogue import SEPARATOR, dialogue_text


def test_turns_are_marked_and_joined_oldest_first() -> None:
    text = dialogue_text([("user", "明天天气"), ("assistant", "晴"), ("user", "那后天呢")], 512)
    assert text == "用户：明天天气[SEP]助手：晴[SEP]用户：那后天呢"


def test_blank_turns_are_dropped_and_whitespace_collapsed() -> None:
    assert dialogue_text([("user", "  "), ("bot", "a \n b"), ("USER", "c")], 512) == "助手：a b[SEP]用户：c"


def test_long_dialogue_keeps_its_end() -> None:
    turns = [("user", "旧" * 100), ("assistant", "中" * 10), ("user", "新的问题")]
    text = dialogue_text(turns, 30)
    assert len(text) <= 30
    assert text.endswith("用户：新的问题")
    assert "旧" not in text


def test_overlong_last_turn_keeps_its_end() -> None:
    assert dialogue_text([("user", "x" * 50 + "end")], 10) == "x" * 7 + "end"


turn = st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=0, max_size=40))


@given(st.lists(turn, min_size=1, max_size=12), st.text(min_size=1, max_size=30).filter(str.strip))
def test_truncation_keeps_the_last_user_turn(history: list[tuple[str, str]], last: str) -> None:
    last_piece = "用户：" + " ".join(last.split())
    budget = len(last_piece) + 5
    text = dialogue_text([*history, ("user", last)], budget)
    assert len(text) <= budget
    assert text.endswith(last_piece)
    assert text == last_piece or text[: -len(last_piece)].endswith(SEPARATOR)
