"""Runs the `molf.testing` example of docs/reliability.md as written, so the doc cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def _example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no example {name!r} in {DOC}"
    return match.group(1)


def test_reliability_doc_example_runs():
    namespace: dict = {}
    exec(compile(_example("test_my_routing"), str(DOC), "exec"), namespace)
    namespace["test_my_routing"]()  # Hypothesis runs it over the profile's examples
