"""Docs that must stay true: the CLI reference, README's set-up commands, the CI script."""

import re
from pathlib import Path

from ssl_blood.cli import cli_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    assert (REPO / "docs" / "cli.md").read_text() == cli_reference_markdown(), (
        "docs/cli.md is stale: regenerate it (command in its header)")


def test_readme_setup_matches_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for step in ("python3 -m venv .venv", "pip install torch==2.14.1 torchvision==0.29.1",
                 "pip install -e '.[dev]'"):
        assert step in readme and step in ci, step
    test_command = re.search(r"SSL_BLOOD_DATA_ROOT=\S+ (\.venv/bin/python -m pytest -q)", readme).group(1)
    assert test_command in ci and "exit 1" in ci.split('"$status" -eq 5')[1]


def test_docs_exist_and_link():
    readme = (REPO / "README.md").read_text()
    for name in ("user-guide", "cli", "architecture", "results", "benchmarks", "immature-granulocytes",
                 "label-efficiency", "data-checks"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
        assert f"docs/{name}.md" in readme


def test_relative_links_resolve():
    """Every relative link and image in README.md and docs/*.md points at a file that exists."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
