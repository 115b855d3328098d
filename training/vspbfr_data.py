"""VSPBFR training pairs: HQ face folders degraded on the fly with the GFPGAN-style blind recipe.

The official datasets (``dataset.py``) differ between the two stages, and :class:`BlindFaceDataset`
reproduces both through :class:`BlindSettings`:

* stage 1 (``ImageFolder_restore``, code diffuser): no flip, no haze, no gray;
* stage 2 (``ImageFolder_restore_free_form``, restoration net): random horizontal flip, haze with
  probability 0.008, gray with probability 0.008 applied to the LQ *and* the HQ.

Draws are seeded per (seed, epoch, index) like every PriorFace dataset, so a resumed run sees the
same pairs. Items follow training/datasets.py's format (``hq``/``lq`` CHW in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from ..inference.degradations import BlindConfig, blind_degrade_one
from ..inference.degradations.ops import to_chw, to_gray, to_hwc
from .datasets import FaceDataset, FaceDatasetConfig, item_seed


@dataclass
class BlindSettings:
    """JSON-able knobs of the blind degradation (ranges as [low, high] lists)."""

    blur_sigma: list[float] = dataclasses.field(default_factory=lambda: [0.1, 10.0])
    downsample: list[float] = dataclasses.field(default_factory=lambda: [0.8, 8.0])
    noise_sigma_255: list[float] = dataclasses.field(default_factory=lambda: [0.0, 20.0])
    jpeg_quality: list[int] = dataclasses.field(default_factory=lambda: [60, 100])
    haze_prob: float = 0.008
    gray_prob: float = 0.008
    hflip: bool = True

    def blind_config(self) -> BlindConfig:
        """The inference/degradations config these settings describe."""
        return BlindConfig(
            blur_sigma=tuple(self.blur_sigma),
            downsample=tuple(self.downsample),
            noise_sigma_255=tuple(self.noise_sigma_255),
            jpeg_quality=tuple(int(q) for q in self.jpeg_quality),
            haze_prob=float(self.haze_prob),
            gray_prob=float(self.gray_prob),
        )


STAGE1_SETTINGS = {"haze_prob": 0.0, "gray_prob": 0.0, "hflip": False}


class BlindFaceDataset(FaceDataset):
    """FaceDataset whose LQ comes from the blind recipe with the given settings (see module docstring)."""

    def __init__(self, config: FaceDatasetConfig, settings: BlindSettings):
        if config.degradation != "blind":
            raise ValueError(f"BlindFaceDataset needs degradation 'blind', got {config.degradation!r}")
        super().__init__(config)
        self.settings = settings
        self.blind = settings.blind_config()

    def __getitem__(self, index: int) -> dict:
        path, rel = self.files[index]
        hq = self.load_hq(path, rel)[0]  # resize or re-align exactly as FaceDataset does
        seed = item_seed(self.config.seed, self.epoch, index)
        params: dict = {"mode": "blind", "seed": seed}
        # The flip gets its own stream so toggling it never changes the degradation draws.
        if self.settings.hflip and np.random.default_rng([seed, 1]).random() < 0.5:
            hq = hq.flip(-1)
            params["hflip"] = True
        lq, drawn = blind_degrade_one(to_hwc(hq.clamp(0, 1)), np.random.default_rng(seed), self.blind)
        params.update(drawn)
        if drawn["gray"]:  # official gt_gray=True: the target is converted as well
            hq = to_chw(to_gray(to_hwc(hq)))
        return {
            "hq": hq,
            "lq": to_chw(lq),
            "name": str(rel.rsplit(".", 1)[0]),
            "index": index,
            "seed": seed,
            "degradation": json.dumps(params),
            "labels": {},
        }


def stack(items: list[dict], key: str, device: torch.device) -> torch.Tensor:
    """Batch one image key of the items on ``device``, mapped from [0, 1] to the networks' [-1, 1]."""
    return torch.stack([it[key] for it in items]).to(device) * 2.0 - 1.0


def batch_seed(items: list[dict], step: int = 0) -> int:
    """Seed for the random draws of one batch at one step, from its items' (seed, epoch, index) seeds.

    Tasks draw their noise from generators seeded with this, not from the global RNG, so the draws
    are the same after a resume on any device and do not depend on where a step was interrupted.
    """
    key = ",".join(str(int(it["seed"])) for it in items) + f":{step}"
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") >> 1
