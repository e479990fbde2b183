"""Docs that must stay true: the CLI reference, README's set-up commands, the CI script."""

import json
import os
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
                 "label-efficiency", "data-checks", "classifier", "your-own-slide", "robustness"):
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


def test_your_own_slide_guide_runs(tmp_path, capsys):
    """Every ssl-blood command of docs/your-own-slide.md, in order, on a tiny folder of PNGs:
    pretraining shortened (1 epoch, the small CNN), the labelling step done by a script."""
    import csv
    import shlex

    import numpy as np

    from ssl_blood.cli import main
    from tests.helpers import make_npz, write_png

    text = (REPO / "docs" / "your-own-slide.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if line.startswith("ssl-blood ")]
    assert [c[0] for c in commands] == ["pretrain", "embed", "select", "train-classifier", "predict",
                                        "train-classifier", "select", "predict", "robustness"]
    arrays = np.load(make_npz(tmp_path / "cells.npz", n_train=96, n_test=40))
    truth = {}
    for name, split in (("cells", "train"), ("new-slide", "test"), ("other-scanner", "test")):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
            if name == "other-scanner":  # a dimmer lamp
                image = (image * 0.8).astype(np.uint8)
            write_png(tmp_path / name / f"c{i:03d}.png", image)
            truth[(name, f"c{i:03d}.png")] = ["basophil", "eosinophil", "lymphocyte", "monocyte"][int(label)]
    tiny = {"pretrain": ["--epochs", "1", "--backbone", "cnn6", "--batch-size", "32"]}

    def download(name, folder, paths, status):
        """What the sheet / review page downloads once a person has answered."""
        with open(name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "status"])
            writer.writerows([p, truth[(folder, p)], status] for p in paths)

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv in commands:
            if argv[0] == "select":  # smaller budgets for 96 cells
                argv = [a if argv[i - 1] != "--budget" else "24" for i, a in enumerate(argv)]
            assert main(argv + tiny.get(argv[0], [])) == 0, argv
            if argv[0] == "select" and "picks.csv" in argv:  # a person labels on the sheet
                assert Path("picks.html").stat().st_size > 1000
                with open("picks.csv", newline="") as f:
                    download("labels.csv", "cells", [r["path"] for r in csv.DictReader(f)], "labelled")
            if argv[0] == "predict" and "--review" in argv:  # and reviews three of the new slide's cells
                assert Path("review.html").is_file()
                with open("slide.csv", newline="") as f:
                    download("corrections.csv", "new-slide", [r["path"] for r in csv.DictReader(f)][:3],
                             "corrected")
        assert (tmp_path / "clf" / "card.md").is_file()
        with open("slide.csv") as f:
            assert len(list(csv.DictReader(f))) == 40
        assert (tmp_path / "slide.counts.json").is_file()
        assert json.loads((tmp_path / "clf2" / "card.json").read_text())["added_to"]["added_labels"] == 3
        with open("labels.csv") as f:
            labelled = {r["path"] for r in csv.DictReader(f)}
        with open("picks2.csv") as f:  # the next round: none of the cells labelled so far
            picked = {r["path"] for r in csv.DictReader(f)}
        assert len(picked) == 24 and len(labelled) == 24 and not picked & labelled
        other = json.loads(Path("other.counts.json").read_text())
        assert other["adapt"] == "auto" and other["adapted"] == ("adabn" if other["shift_warning"] else "none")
        report = json.loads(Path("robustness/robustness.json").read_text())
        assert report["corruptions"][:4] == ["stain", "blur", "resample", "brightness"]
        with open("robustness/robustness.csv") as f:  # clean + every shift run x 5 severities
            measured = [5 - len(report["left_out"].get(n, [])) for n in report["corruptions"]]
            assert len(list(csv.DictReader(f))) == 1 + sum(measured)
    finally:
        os.chdir(cwd)
