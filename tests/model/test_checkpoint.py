"""The checkpoint format: loading checks keys, types and finite weights; format 1 is read."""

import pytest
import torch

from ssl_blood.model.checkpoint import load_backbone, load_checkpoint
from ssl_blood.errors import UserError


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.pop("dataset"), r"'dataset' missing"),
    (lambda c: c.update(epoch="3"), r"'epoch' missing or not a int"),
    (lambda c: c["dataset"].update(channels="3"), r"dataset.channels missing or not a int"),
    (lambda c: c["dataset"].pop("mean"), r"dataset.mean missing"),
    (lambda c: c.update(backbone={"0.weight": [1, 2]}), r"not all tensors"),
    (lambda c: c.update(format_version=99), r"format version 99, newer"),
    (lambda c: c["dataset"].update(std=[float("nan")] * 3), r"non-finite normalisation"),
    (lambda c: c["backbone"].pop("0.weight"), r"do not fit a cnn6"),
])
def test_hand_edited_checkpoints_are_refused(tiny_run, tmp_path, edit, pattern):
    run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(UserError, match=pattern):
        load_backbone(tmp_path / "edited.pt")


def test_format_1_checkpoints_still_load(tiny_run, tmp_path):
    run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for key in ("kind", "backbone_stem"):
        ckpt.pop(key)
    ckpt["format_version"] = 1
    ckpt["config"]["augment"]["local_views"] = 6  # format 1 kept DINO's crops in augment
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["backbone_stem"] == "s1" and loaded["kind"] == "pretrain"
    assert load_backbone(tmp_path / "old.pt").model.num_features == 256


def test_malicious_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format_version": 2, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read `checkpoint`"):
        load_checkpoint(tmp_path / "evil.pt")


def test_a_checkpoint_is_read_once_and_hashed_as_loaded(tiny_run, tmp_path):
    """The SHA-256 a backbone carries is that of the bytes it was built from, so a file changed
    between a hash check and the load cannot slip in under the checked hash."""
    from ssl_blood.files import sha256_bytes, sha256_file

    run, _ = tiny_run
    path = run / "checkpoint.pt"
    assert load_backbone(path).sha256 == sha256_file(path)
    ckpt = torch.load(path, weights_only=True)
    for value in ckpt["backbone"].values():
        if value.is_floating_point():
            value.mul_(2.0)
    torch.save(ckpt, tmp_path / "other.pt")
    other = (tmp_path / "other.pt").read_bytes()
    loaded = load_backbone(path, other)  # the bytes given are what loads, whatever is at `path`
    assert loaded.sha256 == sha256_bytes(other) != sha256_file(path)
    expected = load_backbone(tmp_path / "other.pt").model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
