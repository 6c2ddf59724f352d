"""The async-to-sync generator: substitutions, the ASYNC escape hatch, dead substitutions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import async_to_sync as a2s  # noqa: E402


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def test_convert_replaces_async_tokens() -> None:
    text = src(
        """
        from pgwarden._async.database import AsyncDatabase

        async def main(db: AsyncDatabase) -> None:
            async with db.transaction() as tx:
                await tx.execute("SELECT 1")
            db2 = connect_async()
        """
    )
    used: set[str] = set()
    assert a2s.convert(text, used=used) == src(
        """
        from pgwarden._sync.database import Database

        def main(db: Database) -> None:
            with db.transaction() as tx:
                tx.execute("SELECT 1")
            db2 = connect()
        """
    )
    assert r"\bAsyncDatabase\b" in used
    assert r"\bAsyncTransaction\b" not in used


def test_convert_keeps_words_that_only_contain_a_token() -> None:
    assert a2s.convert("MyAsyncDatabase = awaited\n") == "MyAsyncDatabase = awaited\n"


def test_async_block_keeps_the_else_body_dedented_and_verbatim() -> None:
    text = src(
        """
        async def f() -> None:
            if True:  # ASYNC
                await asyncio.sleep(0)
                x = connect()
            else:
                # sync only
                x = connect_async()

                await_me = 1
            return x
        """
    )
    assert a2s.convert(text) == src(
        """
        def f() -> None:
            # sync only
            x = connect_async()

            await_me = 1
            return x
        """
    )


def test_async_blocks_nested_at_top_level_and_in_else() -> None:
    text = src(
        """
        if True:  # ASYNC - several of them
            if True:  # ASYNC
                a = 1
            else:
                a = 2
        else:
            if True:  # ASYNC
                b = 1
            else:
                b = 2
        c = AsyncDatabase
        """
    )
    assert a2s.convert(text) == "b = 2\nc = Database\n"


def test_plain_if_true_is_left_alone() -> None:
    text = "if True:\n    a = 1\nelse:\n    a = 2\n"
    assert a2s.convert(text) == text


def test_async_block_without_else_is_an_error() -> None:
    with pytest.raises(a2s.ConvertError, match="needs an `else:`"):
        a2s.convert("if True:  # ASYNC\n    a = 1\n")


def test_errors_give_the_line_in_the_async_source() -> None:
    text = (
        "if True:  # ASYNC\n    a = 1\n    b = 1\nelse:\n    a = 2\nif True:  # ASYNC\n    c = 1\n"
    )
    with pytest.raises(a2s.ConvertError, match=r"^line 6: "):
        a2s.convert(text)


def test_async_block_with_elif_is_an_error() -> None:
    with pytest.raises(a2s.ConvertError, match="not `elif`"):
        a2s.convert("if True:  # ASYNC\n    a = 1\nelif x:\n    a = 2\nelse:\n    a = 3\n")


def test_unused_substitution_fails_and_names_it() -> None:
    subs = [(r"\bAsyncFoo\b", "Foo"), (r"\bAsyncBar\b", "Bar"), (r"\basync def\b", "def")]
    texts = {"a.py": "async def f() -> AsyncFoo: ...\n", "b.py": "x: AsyncFoo\n"}
    with pytest.raises(a2s.UnusedSubstitution) as info:
        a2s.convert_all(texts, subs)
    assert info.value.patterns == [r"\bAsyncBar\b"]
    assert r"\bAsyncBar\b" in str(info.value)
    assert a2s.convert_all({**texts, "c.py": "AsyncBar\n"}, subs) == {
        "a.py": "def f() -> Foo: ...\n",
        "b.py": "x: Foo\n",
        "c.py": "Bar\n",
    }


def test_a_token_only_in_a_dropped_async_branch_counts_as_unused() -> None:
    text = "if True:  # ASYNC\n    x = AsyncFoo\nelse:\n    x = Foo\n"
    with pytest.raises(a2s.UnusedSubstitution):
        a2s.convert_all({"a.py": text}, [(r"\bAsyncFoo\b", "Foo")])


def test_convert_all_names_the_file_it_cannot_convert() -> None:
    with pytest.raises(a2s.ConvertError, match=r"^bad\.py: line 2: .* needs an `else:`"):
        a2s.convert_all({"ok.py": "x = 1\n", "bad.py": "x = 1\nif True:  # ASYNC\n    y = 2\n"})
