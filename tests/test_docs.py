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


# ---------------------------------------------------------------- every link and file the README names exists

_REPO_DIRS = ("lut_fast", "pipelines", "datasets", "configs", "docker", "docs", "tests")
_REPO_FILES = ("Makefile", "pyproject.toml", "constraints.txt", "constraints-cu12.txt", "cli.py", ".dockerignore")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_in_the_readme_resolves():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", README, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        if path:
            assert (REPO / path).exists(), f"README links to {path}, which does not exist"
        elif anchor:
            assert anchor in anchors, f"README links to #{anchor}, which is no heading"


def test_every_repo_path_the_readme_names_exists():
    dirs = "|".join(_REPO_DIRS)
    named = set(re.findall(rf"(?<![\w/.~<$-])((?:{dirs})/[\w./-]*\w)", README))
    named |= {f for f in _REPO_FILES if f"`{f}`" in README or f" {f} " in README}
    assert "lut_fast/train.py" in named and "constraints-cu12.txt" in named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"the README names files that do not exist: {missing}"


def test_no_tracked_file_is_ignored_by_gitignore():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout


def test_make_demo_keeps_earlier_runs():
    import subprocess

    proc = subprocess.run(["make", "-n", "-W", ".venv/.installed", "demo"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rm -rf" not in proc.stdout
    folder = re.search(r"train configs/demo\.yaml --out (runs/demo-\d{8}-\d{6})\n", proc.stdout)
    assert folder, proc.stdout
    assert proc.stdout.count(folder.group(1)) >= 3  # the same folder is trained into and printed


def test_every_file_and_function_docs_architecture_cites_exists():
    """docs/ARCHITECTURE.md names code as `path/file.py:name` (or `:Class.method`); each must be there."""
    import ast

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    cited = set(re.findall(r"((?:lut_fast|pipelines|datasets)/[\w/]+\.py):(\w+(?:\.\w+)?)", text))
    assert len(cited) >= 15, "the flow names its boxes as file:function"
    missing = []
    for path, name in sorted(cited):
        file = REPO / path
        if not file.exists():
            missing.append(f"{path} (no such file)")
            continue
        scope: list = ast.parse(file.read_text()).body
        for part in name.split("."):
            found = next((n for n in scope if getattr(n, "name", None) == part  # def / class
                          or any(getattr(t, "id", None) == part  # NAME = ... / NAME: type = ...
                                 for t in getattr(n, "targets", [getattr(n, "target", None)]))), None)
            if found is None:
                missing.append(f"{path}:{name}")
                break
            scope = getattr(found, "body", [])
    assert not missing, f"docs/ARCHITECTURE.md cites what does not exist: {missing}"
