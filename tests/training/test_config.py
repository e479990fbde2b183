"""The pretraining config: presets, JSON, --set, validation of names, types and numbers."""

import json
import math
from dataclasses import replace

import pytest

from ssl_blood.training.config import (PretrainConfig, apply_settings, default_preset, parse_settings,
                                       preset_config)
from ssl_blood.training.recipe import build_config, scale_epochs_to_data
from ssl_blood.errors import UserError


@pytest.mark.parametrize("preset", ["quick", "standard", "full"])
@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_presets_roundtrip_through_json(preset, method):
    cfg = preset_config(preset, method)
    assert cfg.method == method and cfg.preset == preset
    assert PretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg.validate()
    assert set(cfg.to_dict()) & {"simclr", "dino"} == {method}  # only the method's own section


def test_quick_preset_is_what_the_results_measured():
    simclr, dino = preset_config("quick", "simclr"), preset_config("quick", "dino")
    assert (simclr.backbone, simclr.epochs, simclr.batch_size, simclr.lr) == ("cnn6-wide", 8, 256, 0.6)
    assert (dino.backbone, dino.epochs) == ("cnn6", 12) and dino.augment.crop_scale == (0.35, 1.0)
    assert default_preset("cpu") == "quick" and default_preset("cuda") == "full"


def test_standard_preset_is_what_its_search_chose():
    simclr, dino = preset_config("standard", "simclr"), preset_config("standard", "dino")
    assert (simclr.backbone, simclr.epochs, simclr.warmup_epochs) == ("cnn6-wide", 72, 4)
    assert simclr.method_config.temperature == 0.1  # the val winner at 15 minutes
    assert preset_config("quick", "simclr").method_config.temperature == 0.2
    assert (dino.backbone, dino.epochs) == ("cnn6", 84)


@pytest.mark.parametrize("settings, pattern", [
    ({"epochs": "abc"}, r'`set` epochs="abc" is not a valid int'),
    ({"lr": "fast"}, r'`set` lr="fast" is not a valid float'),
    ({"augment.crop_scale": [0.5]}, r"`set` augment.crop_scale=\[0.5\] is not a valid"),
    ({"simclr.temperature": None}, r"`set` simclr.temperature=null is not a valid float"),
    ({"dino.output_dim": 5}, r"'dino' is not a config section \(this run's method is simclr\)"),
    ({"augment.nonsense": 1}, r"no such setting"),
    ({"compile": "yes"}, r'`set` compile="yes" is not a valid bool'),
])
def test_bad_settings_are_refused(settings, pattern):
    with pytest.raises(UserError, match=pattern):
        apply_settings(preset_config("quick"), settings).validate()


@pytest.mark.parametrize("field, value, pattern", [
    ("lr", math.inf, r"`lr` inf must be a finite positive number"),
    ("lr", math.nan, r"`lr` nan must be a finite positive number"),
    ("lr", -0.1, r"`lr` -0.1 must be a finite positive number"),
    ("weight_decay", math.inf, r"`weight_decay` inf must be a finite number"),
    ("lars_trust_coefficient", 0.0, r"`lars_trust_coefficient` 0.0"),
    ("epochs", 0, r"`epochs` 0 must be at least 1"),
    ("batch_size", 1, r"`batch_size` 1 must be at least 2"),
    ("warmup_epochs", 9, r"`warmup_epochs` 9 must be between 0 and `epochs` 8"),
    ("final_lr_ratio", 2.0, r"`final_lr_ratio` 2.0 must be in \[0, 1\]"),
    ("knn_temperature", 0.0, r"`knn_temperature` 0.0 > 0"),
])
def test_numbers_are_validated(field, value, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        replace(preset_config("quick"), **{field: value}).validate()
    assert err.value.params == (field.replace("knn_temperature", "knn_k"),)


@pytest.mark.parametrize("settings, pattern", [
    ({"augment.hflip": 1.5}, "probability"),
    ({"augment.brightness": float("inf")}, "must be finite"),
    ({"augment.crop_scale": [0.8, 0.2]}, "0 < low <= high <= 1"),
    ({"simclr.temperature": -1.0}, "must not be negative"),
])
def test_section_numbers_are_validated(settings, pattern):
    with pytest.raises(UserError, match=pattern):
        apply_settings(preset_config("quick"), settings).validate()


def test_parse_settings():
    assert parse_settings(["augment.hue=0.1", "method=dino", "compile=true", "limit=null"]) == {
        "augment.hue": 0.1, "method": "dino", "compile": True, "limit": None}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_settings(["augment.hue"])


def test_unknown_keys_and_old_configs():
    d = preset_config("quick", "dino").to_dict()
    with pytest.raises(UserError, match="unknown config keys \\['bogus'\\]"):
        PretrainConfig.from_dict({**d, "bogus": 1})
    old = {**d, "augment_pipeline": "device", "num_workers": 0, "simclr": {"temperature": 0.2}}
    old["augment"] = {**d["augment"], "local_views": 4, "local_size": 12, "local_scale": [0.05, 0.3]}
    del old["dino"]
    migrated = PretrainConfig.from_dict(old)  # a format-1 checkpoint's config
    assert migrated.method_config.local_views == 4 and migrated.method_config.local_size == 12


def test_epochs_scale_with_the_data():
    cfg = preset_config("quick")
    assert scale_epochs_to_data(cfg, 11959).epochs == 8
    assert scale_epochs_to_data(cfg, 23918).epochs == 4
    assert scale_epochs_to_data(cfg, 1_000_000).epochs == 1
    assert scale_epochs_to_data(cfg, 100).epochs == 160  # at most 20x


def test_build_config_picks_preset_by_device_and_scales(synthetic_npz, capsys):
    from ssl_blood.data import resolve_source

    source = resolve_source(npz=str(synthetic_npz))  # 64 training images
    cfg = build_config(None, None, None, {}, source, "cpu")
    assert cfg.preset == "quick" and cfg.epochs == 160 and cfg.data == source.to_dict()
    assert "160 epochs for 64 training images" in capsys.readouterr().err
    assert build_config(None, None, None, {"epochs": 3}, source, "cpu").epochs == 3
    assert build_config(None, "dino", None, {"epochs": 3}, source, "cuda").preset == "full"
