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
