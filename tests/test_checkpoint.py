"""Weights I/O: safetensors round trip with config, refusal of unsafe pickles, key reports."""

from __future__ import annotations

import argparse

import pytest
import torch

from priorface.models.checkpoint import (
    CorruptCheckpointError,
    KeyMismatchError,
    UnsafeCheckpointError,
    load_weights,
    read_checkpoint,
    save_safetensors,
)


class _Evil:
    """Pickles into a call that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_safetensors_round_trip_keeps_config(tmp_path):
    net = _net()
    path = save_safetensors(
        net.state_dict(), tmp_path / "net.safetensors", "tiny", {"width": 4, "depth": [1, 2]}
    )
    ckpt = read_checkpoint(path)
    assert ckpt.architecture == "tiny" and ckpt.config == {"width": 4, "depth": [1, 2]}
    other = _net()
    torch.nn.init.zeros_(other[0].weight)
    load_weights(other, ckpt.content, source=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_checkpoint(path)
    assert not marker.exists(), "the pickle's payload ran"
    message = str(err.value)
    assert str(path) in message and "weights_only" in message and "io.open" in message


def test_allow_list_admits_only_what_is_named(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"g_ema": {"w": torch.ones(3)}, "args": argparse.Namespace(size=512)}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    ckpt = read_checkpoint(path, allowed_globals=[argparse.Namespace])
    assert ckpt.content["args"].size == 512 and torch.equal(ckpt.content["g_ema"]["w"], torch.ones(3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_files_raise_corrupt_with_name(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        save_safetensors(_net().state_dict(), good, "tiny", {})
    else:
        torch.save(_net().state_dict(), good)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="bad"):
        read_checkpoint(bad)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_key_mismatch_lists_names_and_shapes():
    net = _net()
    sd = dict(net.state_dict())
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5)
    with pytest.raises(KeyMismatchError) as err:
        load_weights(_net(), sd, source="test.safetensors")
    text = str(err.value)
    assert "0.bias" in text and "extra.weight" in text and "1.weight" in text and "test.safetensors" in text


def test_ignore_patterns_are_explicit():
    sd = dict(_net().state_dict())
    sd["conv_degradation.0.0.weight"] = torch.zeros(1)
    sd.pop("1.num_batches_tracked")
    report = load_weights(
        _net(), sd, ignore_missing=["*.num_batches_tracked"], ignore_unexpected=["conv_degradation.*"]
    )
    assert report.ok
