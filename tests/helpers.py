"""Helpers the tests import: synthetic data, BloodMNIST folders, the CLI, headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CELL_NAMES = ("basophil", "immature granulocytes", "monocyte", "neutrophil")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def make_npz(path: Path, n_train: int = 64, n_val: int = 24, n_test: int = 24, size: int = 16,
             channels: int = 3, classes: int = 4, seed: int = 0,
             class_names: tuple[str, ...] | None = None) -> Path:
    """A MedMNIST-format file whose classes differ in colour and brightness (learnable)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.arange(n) % classes
        base = (40 + 180 * labels / max(1, classes - 1))[:, None, None, None]
        noise = rng.normal(0, 20, size=(n, size, size, channels))
        images = np.clip(base + noise, 0, 255).astype(np.uint8)
        if channels == 1:
            images = images[..., 0]
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None].astype(np.int64)
    if class_names:
        arrays["class_names"] = np.array(class_names)
    np.savez(path, **arrays)
    return path


def npz_slide(npz: Path, split: str, folder: Path, labels_csv: Path | None = None,
              labelled: int = 0) -> dict[str, str]:
    """A split of a synthetic npz (make_npz) as a flat folder of PNGs c000.png, c001.png, ...;
    with `labels_csv`, a labels file (path, label) naming the first `labelled` cells by their
    true class. Returns every file's true class."""
    arrays = np.load(npz)
    truth = {}
    for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
        write_png(folder / f"c{i:03d}.png", image)
        truth[f"c{i:03d}.png"] = CELL_NAMES[int(label)]
    if labels_csv is not None:
        with open(labels_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(list(truth.items())[:labelled])
    return truth


def bloodmnist_subset(data_root: Path, per_split: dict[str, int], seed: int = 0) -> dict:
    """{split: (images (N, 28, 28, 3) uint8, labels (N,), ids (N,))}: a stratified subset."""
    from ssl_blood.data import stratified_indices

    arrays = np.load(data_root / "bloodmnist.npz")
    out = {}
    for split, n in per_split.items():
        labels = arrays[f"{split}_labels"][:, 0]
        ids = stratified_indices(labels, n, seed)
        out[split] = (arrays[f"{split}_images"][ids], labels[ids], ids)
    return out


def class_names_of_bloodmnist() -> tuple[str, ...]:
    from medmnist.info import INFO

    return tuple(n.split("(")[0].strip() for _, n in sorted(INFO["bloodmnist"]["label"].items(),
                                                            key=lambda kv: int(kv[0])))


def write_png(path: Path, image: np.ndarray, size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    if size is not None and size != image.shape[0]:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    img.save(path)


def bloodmnist_folder(root: Path, subset: dict, layout: str, size: int | None = None) -> Path:
    """Write a BloodMNIST subset as PNG files in one of the three layouts: "splits"
    (ROOT/split/class/id.png), "classes" (ROOT/class/split-id.png) or "flat"."""
    names = class_names_of_bloodmnist()
    for split, (images, labels, ids) in subset.items():
        for image, label, i in zip(images, labels, ids):
            if layout == "splits":
                path = root / split / names[label] / f"{i:05d}.png"
            elif layout == "classes":
                path = root / names[label] / f"{split}-{i:05d}.png"
            else:
                path = root / f"{split}-{i:05d}.png"
            write_png(path, image, size)
    return root


def bloodmnist_manifest(root: Path, subset: dict, extra: bool = True) -> Path:
    """Images under ROOT/img/ and ROOT/cells.csv with path, label, split (+ patient)."""
    names = class_names_of_bloodmnist()
    rows = []
    for split, (images, labels, ids) in subset.items():
        for image, label, i in zip(images, labels, ids):
            rel = f"img/{split}-{i:05d}.png"
            write_png(root / rel, image)
            rows.append({"path": rel, "label": names[label], "split": split,
                         **({"patient": f"P{i % 7}"} if extra else {})})
    with open(root / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "cells.csv"


# ----------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv):
    from ssl_blood import ui
    from ssl_blood.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    finally:
        ui.set_quiet(False)
    captured = capsys.readouterr()
    if argv and "--help" not in argv:
        assert_flags_exist(str(argv[0]), captured.err)
    return code, captured.out, captured.err


def flags_of(command: str) -> set[str]:
    from ssl_blood.cli import _subparser, build_parser

    return {f for a in _subparser(build_parser(only=command), command)._actions for f in a.option_strings}


def assert_flags_exist(command: str, err: str) -> None:
    """Every --flag an error or note of `command` names is a flag of that command, or of another
    command the message names in full ("ssl-blood index ... --nprobe")."""
    from ssl_blood.cli import command_names

    if command not in command_names():
        return
    for line in err.splitlines():
        named = [c for c in command_names() if f"ssl-blood {c} " in line.replace(f"ssl-blood {command}:", "")]
        known = set().union(flags_of(command), *(flags_of(c) for c in named), {"--set"})
        unknown = [f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line) if f not in known]
        assert not unknown, f"'ssl-blood {command}' names flags it lacks {unknown}: {line}"


def assert_one_line_error(code, err, pattern, exit_code=2):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes (to check nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- browser


def chrome():
    """Headless Chromium (Debian's) with browser and network logs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def stored_answers(driver, prefix: str) -> int:
    """How many answers the browser process holds in a page's localStorage entry (key starting
    `prefix`), read through DevTools: a page's setItem reaches the browser process
    asynchronously, so a test that reloads at once can race it; wait for this first."""
    storage = driver.execute_cdp_cmd("DOMStorage.getDOMStorageItems",
                                     {"storageId": {"securityOrigin": "file://", "isLocalStorage": True}})
    return max([len(json.loads(value)) for key, value in storage["entries"] if key.startswith(prefix)],
               default=0)


def requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


DEEP_QUERY = """
function deep(root, sel, acc){ for (const e of root.querySelectorAll(sel)) acc.push(e);
  for (const e of root.querySelectorAll('*')) if (e.shadowRoot) deep(e.shadowRoot, sel, acc); return acc; }
return deep(document, arguments[0], []).filter(e => e.getClientRects().length).map(e => e.textContent);
"""


def wait_for(condition, timeout: float = 10.0, step: float = 0.1):
    """Poll `condition()` until it returns something truthy (returned) or time runs out."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


def two_clusters(labelled_per_class: int, pool_per_class: int = 100, seed: int = 0):
    """Two classes as two clusters of L2-normalised 8-d features: a pool (features, classes)
    and labelled cells (features, classes), drawn in that order from one generator."""
    from ssl_blood.features.embeddings import l2_normalize

    rng = np.random.default_rng(seed)
    centres = np.eye(2, 8, dtype=np.float32) * 5
    pool_labels = np.repeat([0, 1], pool_per_class)
    pool = l2_normalize(centres[pool_labels] + rng.normal(0, 1, (len(pool_labels), 8)).astype(np.float32))
    labels = np.repeat([0, 1], labelled_per_class)
    features = l2_normalize(centres[labels] + rng.normal(0, 1, (len(labels), 8)).astype(np.float32))
    return pool, pool_labels, features, labels
