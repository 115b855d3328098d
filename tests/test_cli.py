"""The ``priorface`` command: info, convert, faces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from priorface.cli import main
from priorface.models.checkpoint import read_checkpoint

FFHQ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "dev" / "ffhq"


def test_info_lists_model_folders(tmp_path, capsys):
    (tmp_path / "sams").mkdir()
    (tmp_path / "sams" / "sam_vit_b.pth").write_bytes(b"0")
    assert main(["info", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "priorface" in out and "sam_vit_b.pth" in out and "device: cpu" in out


def test_convert_pickle_to_safetensors(tmp_path):
    src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": {"conv.weight": torch.ones(2, 2)}, "step": 5}, src)
    assert main(["convert", str(src), str(dst), "--architecture", "demo"]) == 0
    ckpt = read_checkpoint(dst)
    assert ckpt.architecture == "demo" and torch.equal(
        ckpt.content["state_dict.conv.weight"], torch.ones(2, 2)
    )


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["faces", str(tmp_path / "missing.jpg"), "-o", str(tmp_path)]) == 2
    assert "no such photo" in capsys.readouterr().err


@pytest.mark.skipif(not FFHQ.is_dir(), reason="shared FFHQ faces not present")
def test_faces_writes_crops_previews_and_round_trip(tmp_path):
    out = tmp_path / "out"
    assert main(["faces", str(FFHQ / "00003.png"), "-o", str(out), "--size", "512", "--upscale", "2"]) == 0
    summary = json.loads((out / "faces.json").read_text())
    assert len(summary[0]["faces"]) == 1 and summary[0]["round_trip_mean_error_255"] < 1.0
    from PIL import Image

    assert Image.open(out / "00003_face00.png").size == (512, 512)
    assert Image.open(out / "00003_pasted.png").size == (1024, 1024)
    assert (out / "00003_detections.png").is_file()


WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "llvfsr-x8.safetensors"


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="embedded weights not present")
def test_restore_demo_photo_with_embedded_weights(tmp_path, capsys):
    pytest.importorskip("skimage")
    assert main(["restore", "--weights", "llvfsr-x8", "-o", str(tmp_path)]) == 0
    assert "restored" in capsys.readouterr().out
    from PIL import Image

    restored = Image.open(tmp_path / "astronaut_small_restored.png")
    bicubic = Image.open(tmp_path / "astronaut_small_bicubic.png")
    assert restored.size == bicubic.size == (510, 510)


def test_convert_recognises_official_vspbfr_files(tmp_path):
    import tiny_vspbfr

    from priorface.models.checkpoint import read_checkpoint as read

    files = tiny_vspbfr.write_official_files(tiny_vspbfr.tiny_models(), tmp_path / "official")
    for slot, path in files.items():
        target = tmp_path / f"{slot}.safetensors"
        assert main(["convert", str(path), str(target)]) == 0
        assert read(target).architecture.startswith("vspbfr"), slot
