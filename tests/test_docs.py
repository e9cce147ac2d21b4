"""The README stays true: opening commands, the config table, CI calling the README's command."""

from __future__ import annotations

import re
from pathlib import Path

from lut_fast.config import defaults_table

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert [ln for ln in ci.splitlines() if ln.startswith("make ")] == ["make test"]


def test_config_table_matches_the_dataclass_defaults():
    table = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", README, re.S).group(1)
    assert table.strip() == defaults_table().strip(), "regenerate with: python -m lut_fast.config"


def test_readme_images_exist():
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (REPO / ref).exists(), ref
