"""Shared fixtures: the real BloodMNIST root, synthetic npz files and image folders, tiny configs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ARTIFACTS, CELL_NAMES, REPO, make_npz

# Progress lines off a terminal come every 30 s: on a busy machine a slow command would print
# one before its error and the one-line checks would depend on the load. Tests that check the
# lines set their own interval.
os.environ["SSL_BLOOD_PROGRESS_EVERY"] = "1e9"


def _data_root() -> Path | None:
    for candidate in (os.environ.get("SSL_BLOOD_DATA_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "bloodmnist.npz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache folder (never the user's)."""
    monkeypatch.setenv("SSL_BLOOD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "decode-cache"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder with the official bloodmnist.npz (CI sets SSL_BLOOD_DATA_ROOT)."""
    root = _data_root()
    if root is None:
        if os.environ.get("CI") or os.environ.get("SSL_BLOOD_REQUIRE_DATA"):
            pytest.fail("bloodmnist.npz not found: set SSL_BLOOD_DATA_ROOT")
        pytest.skip("bloodmnist.npz not found: set SSL_BLOOD_DATA_ROOT to run tests on real data")
    return root


@pytest.fixture
def synthetic_npz(tmp_path: Path) -> Path:
    return make_npz(tmp_path / "cells.npz")


@pytest.fixture
def loose_folder(tmp_path: Path) -> Path:
    """Nine readable images of mixed size, mode and format, loose in one folder (unlabelled),
    plus one broken file and a text file."""
    root = tmp_path / "smears"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        size = (40 + 5 * i, 36 + 3 * i)
        image = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
        if i % 3 == 1:
            image = image.convert("L")
        elif i % 3 == 2:
            image = image.convert("RGBA")
        image.save(root / f"cell{i}.{['png', 'jpg', 'tif'][i % 3]}")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def tiny_config(synthetic_npz: Path):
    """A config that trains in about a second on the CPU."""
    from ssl_blood.training.config import preset_config
    from ssl_blood.data import resolve_source

    cfg = preset_config("quick", "simclr")
    return replace(cfg, data=resolve_source(npz=str(synthetic_npz)).to_dict(), backbone="cnn6", epochs=2,
                   batch_size=16, warmup_epochs=1, knn_every=1, precision="fp32",
                   method_config=replace(cfg.method_config, projection_hidden_dim=64, projection_dim=32))


def tiny_dino(cfg):
    from ssl_blood.methods.dino import DINOConfig

    return replace(cfg, method="dino", method_config=DINOConfig(output_dim=128, hidden_dim=64,
                                                                 bottleneck_dim=32))


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A pretrained run on a synthetic npz (session-wide): (run_dir, npz_path)."""
    from ssl_blood.training.config import preset_config
    from ssl_blood.data import resolve_source
    from ssl_blood.training.loop import pretrain

    root = tmp_path_factory.mktemp("tiny_run")
    npz = make_npz(root / "cells.npz", n_train=96, n_val=32, n_test=40, class_names=CELL_NAMES)
    cfg = preset_config("quick", "simclr")
    cfg = replace(cfg, data=resolve_source(npz=str(npz)).to_dict(), backbone="cnn6", epochs=3,
                  batch_size=32, warmup_epochs=1, knn_every=1, precision="fp32",
                  method_config=replace(cfg.method_config, projection_hidden_dim=64, projection_dim=32))
    pretrain(cfg, root / "run", progress=False)
    return root / "run", npz


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_run, tmp_path_factory):
    """embeddings.npz of the tiny run (all splits)."""
    from ssl_blood.features.embeddings import embed_checkpoint

    run, _ = tiny_run
    path = tmp_path_factory.mktemp("tiny_emb") / "emb.npz"
    embed_checkpoint(run / "checkpoint.pt").save(path)
    return path
