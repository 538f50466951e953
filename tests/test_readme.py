"""The README's map of the code names every module, so a reader finds any concern by folder and file name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def folder_row(folder: str) -> str:
    """The row of the README's folder table that describes ``folder``."""
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{folder}/`")]
    assert len(rows) == 1, f"README.md has {len(rows)} rows for {folder}/"
    return rows[0]


@pytest.mark.parametrize("folder", ["operators", "connectors", "nudgeflow"])
def test_the_readme_names_every_module_of_a_code_folder(folder: str) -> None:
    named = set(re.findall(r"`([a-z_]+)`", folder_row(folder)))
    modules = {p.stem for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
    assert modules and not modules - named, f"README.md's {folder}/ row does not name {sorted(modules - named)}"
