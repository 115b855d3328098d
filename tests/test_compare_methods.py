"""Comparison grid: layout, resizing of other sizes, scores equal to the metrics computed directly."""

from __future__ import annotations

import json

import pytest
import torch

from priorface.inference.metrics.psnr_ssim import psnr, ssim


def _faces(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def test_grid_scores_match_direct_metrics_and_other_sizes_are_resized(comfy_env, check_outputs):
    from priorface.nodes.compare_nodes import CompareMethodsNode

    reference = _faces(0)
    good = (reference + 0.02 * _faces(1)).clamp(0, 1)
    small = _faces(2, size=16)  # a method with a smaller output: shown and scored at 32 px
    degraded = _faces(3, size=8)
    out = CompareMethodsNode().compare(
        degraded, "close, small", False, reference=reference, method_1=good, method_2=small
    )
    grid, table, payload = out["result"]
    check_outputs(CompareMethodsNode, out["result"])
    rows = json.loads(payload)
    assert [(r["method"], r["face"]) for r in rows] == [
        ("close", 0),
        ("small", 0),
        ("close", 1),
        ("small", 1),
    ]
    ref0 = reference[:1].permute(0, 3, 1, 2)
    assert rows[0]["psnr"] == pytest.approx(float(psnr(good[:1].permute(0, 3, 1, 2), ref0)[0]))
    assert rows[0]["ssim"] == pytest.approx(float(ssim(good[:1].permute(0, 3, 1, 2), ref0)[0]))
    assert rows[0]["psnr"] > rows[1]["psnr"] + 10
    assert rows[1]["resized_from"] == [16, 16] and rows[0]["resized_from"] is None
    # Two face rows of 4 columns (degraded, two methods, reference), each cell 32 px wide.
    assert grid.shape[0] == 1 and grid.shape[2] >= 4 * 32 and grid.shape[1] >= 2 * 32
    assert "face 1 | small" in table


def test_without_reference_nothing_is_scored_and_no_method_is_an_error(comfy_env):
    from priorface.nodes.compare_nodes import CompareMethodsNode

    out = CompareMethodsNode().compare(_faces(3, n=1, size=8), "", False, method_3=_faces(4, n=1))
    rows = json.loads(out["result"][2])
    assert rows[0]["method"] == "method 3" and rows[0]["psnr"] is None
    with pytest.raises(ValueError, match="at least one method"):
        CompareMethodsNode().compare(_faces(3, n=1), "a", False)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        CompareMethodsNode().compare(_faces(3, n=2), "a", False, method_1=_faces(4, n=3))


def test_identity_distance_is_reported_when_asked(comfy_env):
    pytest.importorskip("dlib")
    from priorface.inference.metrics.identity import identity_available
    from priorface.nodes.compare_nodes import CompareMethodsNode

    if not identity_available():
        pytest.skip("dlib face models not installed")
    reference = _faces(0, n=1, size=64)
    out = CompareMethodsNode().compare(reference, "same", True, reference=reference, method_1=reference)
    assert json.loads(out["result"][2])[0]["identity_distance"] == pytest.approx(0.0, abs=1e-6)
