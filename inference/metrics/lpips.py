"""LPIPS from local weight files only: the LPIPS v0.1 heads and the torchvision VGG16 backbone.

Both files go in the ``priorface_metrics`` model folder (ComfyUI ``models/priorface/metrics``):
``vgg.pth`` (LPIPS v0.1 linear layers, from the LPIPS repository's ``weights/v0.1``) and
``vgg16-397923af.pth`` (torchvision's ImageNet VGG16). Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ...models.checkpoint import load_weights, read_checkpoint
from ...models.lpips_vgg import LPIPSVGG
from ..model_files import MODEL_KINDS, ModelFileNotFoundError, ModelLocator

log = logging.getLogger(__name__)

METRICS_KIND = "priorface_metrics"
LINEAR_FILE = "vgg.pth"
BACKBONE_FILE = "vgg16-397923af.pth"


class LPIPSWeightsMissing(FileNotFoundError):
    """One or both LPIPS weight files are not in the metrics model folder."""


def _resolve_or_none(locator: ModelLocator, name: str) -> Path | None:
    try:
        return locator.resolve(METRICS_KIND, name)
    except ModelFileNotFoundError:
        return None


def find_lpips_files(locator: ModelLocator) -> tuple[Path, Path]:
    """Paths of (vgg.pth, vgg16-397923af.pth), or LPIPSWeightsMissing naming both and where they go."""
    linear, backbone = _resolve_or_none(locator, LINEAR_FILE), _resolve_or_none(locator, BACKBONE_FILE)
    if linear is not None and backbone is not None:
        return linear, backbone
    missing = [n for n, p in ((LINEAR_FILE, linear), (BACKBONE_FILE, backbone)) if p is None]
    searched = "\n".join(f"  - {d}" for d in locator.search_dirs(METRICS_KIND)) or "  (no folder configured)"
    raise LPIPSWeightsMissing(
        f"LPIPS needs two weight files and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
        f"missing: {LINEAR_FILE} (LPIPS v0.1 linear layers, weights/v0.1/vgg.pth of the LPIPS project) "
        f"and {BACKBONE_FILE} (torchvision's ImageNet VGG16). Put both in ComfyUI's "
        f"models/{MODEL_KINDS[METRICS_KIND].subdir}/ folder (key '{METRICS_KIND}', headless: --models-dir). "
        f"Searched:\n{searched}\nPriorFace never downloads weights."
    )


def load_lpips_files(linear_path: str | Path, backbone_path: str | Path) -> LPIPSVGG:
    """Build LPIPS-VGG from the two files; key mismatches are reported by name."""
    linear = read_checkpoint(linear_path).content
    backbone = read_checkpoint(backbone_path).content
    for path, content in ((linear_path, linear), (backbone_path, backbone)):
        if not isinstance(content, dict):
            raise ValueError(f"{path} should hold a state dict, got {type(content).__name__}")
    merged = {k: v for k, v in backbone.items() if k.startswith("features.")}
    merged.update(linear)
    model = LPIPSVGG()
    load_weights(
        model,
        merged,
        source=f"{Path(linear_path).name} + {Path(backbone_path).name}",
        ignore_unexpected=("classifier.*",),
    )
    return model.eval().requires_grad_(False)


def load_lpips(locator: ModelLocator, cached: bool = True) -> LPIPSVGG:
    """Find both files through ``locator`` and build the network (CPU, eval mode).

    With ``cached`` the last network is reused while both files are unchanged (the VGG16 file is
    about 500 MB, too slow to re-read on every node run).
    """
    linear, backbone = find_lpips_files(locator)
    if not cached:
        return load_lpips_files(linear, backbone)
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (linear, backbone))
    return _load_cached(stamp)


@functools.lru_cache(maxsize=1)
def _load_cached(stamp: tuple) -> LPIPSVGG:
    (linear, *_), (backbone, *_) = stamp
    log.info("loading LPIPS weights: %s, %s", linear, backbone)
    return load_lpips_files(linear, backbone)


@torch.no_grad()
def lpips_distance(model: LPIPSVGG, a: torch.Tensor, b: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Per-image LPIPS between two BCHW [0, 1] batches of one shape, in chunks to bound memory."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, a.shape[0], batch_size):
        d = model(a[i : i + batch_size].to(device).float(), b[i : i + batch_size].to(device).float())
        out.extend(float(v) for v in d.cpu())
    return out
