"""docs/security.md names, for each case, the tests that prove it. A test renamed or
removed would leave the page citing nothing (it happened: ``test_tmp_is_sized``), so every
``tests/<file>.py::<test>`` it names must exist, and every case of the requirements
(1-25) must be on it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "security.md").read_text()


def test_every_test_the_page_names_exists():
    cited = set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", PAGE))
    assert len(cited) > 100, len(cited)
    missing = []
    for path, name in sorted(cited):
        source = ROOT / path
        if not source.is_file():
            missing.append(path)
        elif name and not re.search(rf"^\s*(async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, missing


def test_every_case_of_the_requirements_has_a_section():
    cases = [int(n) for n in re.findall(r"^### Case (\d+):", PAGE, re.M)]
    assert cases == sorted(cases) and set(range(1, 26)) <= set(cases), cases
