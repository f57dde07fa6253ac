"""The README's SDK example runs as written against the live server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from openrun import Sandbox

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("\n## Python SDK\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's SDK section has one python example"
    return blocks[0]


def test_the_readme_example_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, server_url: str, api_key: str, label: dict
) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.setenv("OPENRUN_SERVER", server_url)
    monkeypatch.setenv("OPENRUN_API_KEY", api_key)
    before = {s.id for s in Sandbox.list()}
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    # The first try failed (its traceback streamed to on_stderr), the fix passed, the patch
    # shows the fix.
    assert "AssertionError" in out
    assert "ok\n" in out
    assert "+    return a + b" in out
    # The context manager killed it.
    assert {s.id for s in Sandbox.list()} <= before
