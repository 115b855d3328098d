"""The shipped LLV-FSR weights still restore the real dev faces (a guard against a bad re-export)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "faces" / "dev" / "ffhq"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEV.is_dir(), reason="shared dev faces not present"),
]


# Floors sit well below the figures in weights/README.md (x8 +1.7 dB, blind +1.4 dB) so that
# only a broken or swapped file fails, not a retrain that moves a figure by a tenth of a dB.
@pytest.mark.parametrize("name,min_gain", [("llvfsr-x8", 1.2), ("llvfsr-blind", 1.0)])
def test_embedded_weights_beat_the_degraded_input_on_dev_faces(name, min_gain, one_thread):
    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_llvfsr import dev_set, scores

    from priorface.inference.llvfsr_restore import load_llvfsr_model, upscale_faces

    model = load_llvfsr_model(str(ROOT / "weights" / f"{name}.safetensors"))
    hq, lq, baseline = dev_set(model, model.task["degradation"], 1234)
    ours, base = scores(name, upscale_faces(model, lq), hq), scores("baseline", baseline, hq)
    assert ours["psnr"] - base["psnr"] >= min_gain
    assert ours["identity"] < base["identity"]


def test_eval_script_band_table_locates_the_gain(capsys, one_thread):
    """The --bands table: the x8 weights win in the 16-32 px band and cannot guess the top octave."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_llvfsr import main

    assert main([str(ROOT / "weights" / "llvfsr-x8.safetensors"), "--bands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {
        ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ("<16", "16-32", "32-64", ">64")
    }
    assert list(rows) == ["<16", "16-32", "32-64", ">64"]
    share = {band: float(row.split("(")[-1].rstrip("%)")) for band, row in rows.items()}
    assert share["16-32"] > 30 and abs(share[">64"]) < 5
    assert any(ln.startswith("PSNR gain over bicubic without the >64 band") for ln in lines)
