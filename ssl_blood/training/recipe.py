"""The config of a new run: a preset or a saved config, sized for the data, with the user's
settings on top. Above `config` (plain values) because sizing a preset reads the data."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ssl_blood import ui
from ssl_blood.errors import UserError
from ssl_blood.training.config import (BLOODMNIST_TRAIN, PretrainConfig, default_preset,
                                       preset_config)


def scale_epochs_to_data(cfg: PretrainConfig, train_size: int) -> PretrainConfig:
    """A preset is a budget of images seen: on a dataset of another size its epochs scale by
    11,959 / train_size (at least 1, at most 20x the preset's), warm-up likewise."""
    factor = min(20.0, BLOODMNIST_TRAIN / max(1, train_size))
    epochs = max(1, round(cfg.epochs * factor))
    warmup = min(epochs, round(cfg.warmup_epochs * factor))
    return replace(cfg, epochs=epochs, warmup_epochs=warmup)


def build_config(preset: str | None, method: str | None, config_file: str | None,
                 overrides: dict[str, Any], source: Any, device_type: str) -> PretrainConfig:
    """The config of a new run: a saved config.json or the named preset (default by device),
    with explicit settings on top. A preset's epochs scale to the data's size unless epochs is
    given (`scale_epochs_to_data`)."""
    from ssl_blood.data import load_split

    if config_file:
        cfg = PretrainConfig.load(config_file)
        if method and method != cfg.method:
            raise UserError(f"`method` {method} differs from the config file's {cfg.method}; edit "
                            f"the file or drop method", param="method")
    else:
        cfg = preset_config(preset or default_preset(device_type), method or "simclr")
        if "epochs" in overrides and overrides.get("minutes") is not None:
            raise UserError("give `epochs` or `minutes`, not both: minutes sizes the epochs",
                            param=("epochs", "minutes"))
        if "epochs" not in overrides and overrides.get("minutes") is None:
            train_size = len(load_split(source, "train", overrides.get("limit")))
            scaled = scale_epochs_to_data(cfg, train_size)
            if scaled.epochs != cfg.epochs:
                ui.note(f"preset {cfg.preset}: {scaled.epochs} epochs for {train_size} training "
                        f"images ({cfg.epochs} for BloodMNIST's {BLOODMNIST_TRAIN}); set epochs to "
                        f"choose")
            cfg = scaled
    return PretrainConfig.from_dict({**cfg.to_dict(), **overrides, "data": source.to_dict()})
