"""Shared fixtures: the real BloodMNIST root, synthetic npz files and image folders, tiny configs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"


def _data_root() -> Path | None:
    for candidate in (os.environ.get("SSL_BLOOD_DATA_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "bloodmnist.npz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder with the official bloodmnist.npz (CI sets SSL_BLOOD_DATA_ROOT)."""
    root = _data_root()
    if root is None:
        if os.environ.get("CI") or os.environ.get("SSL_BLOOD_REQUIRE_DATA"):
            pytest.fail("bloodmnist.npz not found: set SSL_BLOOD_DATA_ROOT")
        pytest.skip("bloodmnist.npz not found: set SSL_BLOOD_DATA_ROOT to run tests on real data")
    return root


CELL_NAMES = ("basophil", "immature granulocytes", "monocyte", "neutrophil")


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


@pytest.fixture
def synthetic_npz(tmp_path: Path) -> Path:
    return make_npz(tmp_path / "cells.npz")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Nine readable images of mixed size and mode in nested folders, plus one broken file."""
    root = tmp_path / "smears"
    rng = np.random.default_rng(0)
    for i in range(9):
        folder = root / f"slide{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (40 + 5 * i, 36 + 3 * i)
        array = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array)
        if i % 3 == 1:
            image = image.convert("L")
        elif i % 3 == 2:
            image = image.convert("RGBA")
        image.save(folder / f"cell{i}.{['png', 'jpg', 'tif'][i % 3]}")
    (root / "slide0" / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def tiny_config(synthetic_npz: Path):
    """A config that trains in about a second on the CPU."""
    from ssl_blood.config import preset_config
    from ssl_blood.data import resolve_source

    cfg = preset_config("quick", "simclr")
    return replace(cfg, data=resolve_source(npz=str(synthetic_npz)).to_dict(), backbone="cnn6", epochs=2,
                   batch_size=16, warmup_epochs=1, knn_every=1, precision="fp32",
                   simclr=replace(cfg.simclr, projection_hidden_dim=64, projection_dim=32),
                   dino=replace(cfg.dino, output_dim=128, hidden_dim=64, bottleneck_dim=32))


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A pretrained run on a synthetic npz (session-wide): (run_dir, npz_path)."""
    from ssl_blood.config import preset_config
    from ssl_blood.data import resolve_source
    from ssl_blood.train import pretrain

    root = tmp_path_factory.mktemp("tiny_run")
    npz = make_npz(root / "cells.npz", n_train=96, n_val=32, n_test=40, class_names=CELL_NAMES)
    cfg = preset_config("quick", "simclr")
    cfg = replace(cfg, data=resolve_source(npz=str(npz)).to_dict(), backbone="cnn6", epochs=3, batch_size=32,
                  warmup_epochs=1, knn_every=1, precision="fp32",
                  simclr=replace(cfg.simclr, projection_hidden_dim=64, projection_dim=32))
    pretrain(cfg, root / "run", progress=False)
    return root / "run", npz
