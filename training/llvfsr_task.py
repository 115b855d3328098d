"""Training LLV-FSR with the generic loop: data, embedded priors, L1 loss, validation, export.

Priors are the embedded defaults (nothing downloaded): the facial-region mask drawn from 5
landmarks (precomputed for the training faces by ``scripts/face_landmarks.py``; faces without
detected landmarks, and the validation faces, use the alignment template's points, which is what
an aligned crop has at inference when no landmarks are passed) and MiniLM embeddings of template
captions (UTKFace labels; "a photo of a face" without labels). The paper computes priors from the
LR face at inference; here the mask geometry comes from landmarks, which the face pipeline detects
on the whole photo, not on the 16-px LR crop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..inference.face_align import template_points
from ..inference.images import resize_bchw
from ..inference.llvfsr_restore import run_batched
from ..models.llvfsr import build_llvfsr, save_llvfsr
from .datasets import FaceDataset, FaceDatasetConfig
from .loop import TrainTask

log = logging.getLogger(__name__)


@dataclass
class LLVFSRTaskConfig:
    """Model, data and prior settings of an LLV-FSR run (saved with every checkpoint)."""

    train_dirs: list[str]
    val_dirs: list[str] = field(default_factory=list)
    val_source_template: str | None = "ffhq"  # validation faces are aligned to this template
    template: str = "utkface"  # framing of the training faces and of the model's output
    size: int = 128  # HR side
    degradation: str = "bicubic_x8"  # a degradations mode
    landmarks_json: str | None = None  # {relative name: [[x, y] x5] in source pixels | null}
    # True: warp every training face onto the template with its landmarks (the framing the face
    # pipeline produces at inference); False: use the files' own crop as the framing
    align_train: bool = False
    source_size: int = 200  # side of the training files the landmarks were measured on
    priors: list[str] = field(default_factory=lambda: ["mask", "caption"])
    preset: str = "small"
    model: dict = field(default_factory=dict)  # LLVFSRConfig overrides
    max_train_items: int | None = None
    val_seed: int = 1234  # fixed degradation of the validation faces
    samples: int = 4  # validation faces shown in the sample grid


class LLVFSRTask(TrainTask):
    """LLV-FSR on HQ face folders with embedded priors."""

    name = "llvfsr"

    def __init__(self, cfg: LLVFSRTaskConfig):
        self.cfg = cfg
        self._landmarks = json.loads(Path(cfg.landmarks_json).read_text()) if cfg.landmarks_json else {}
        self._caption_cache: dict[str, Any] = {}
        self._encoder = None
        self._val = None

    # -- model -------------------------------------------------------------------------------
    def model_config(self):
        """The LLVFSRConfig this task trains."""
        from ..inference.priors.landmark_mask import MASK_LABELS
        from ..models.llvfsr import llvfsr_config

        overrides = {"mask_classes": len(MASK_LABELS), "text_dim": 384, **self.cfg.model}
        return llvfsr_config(self.cfg.preset, **overrides)

    def build_model(self) -> torch.nn.Module:
        return build_llvfsr(self.model_config())

    def trained_with(self) -> dict[str, dict]:
        """Provenance of each prior the model sees, stored in its weights file."""
        from ..inference.priors.landmark_mask import MASK_EXTRACTOR_ID, MASK_SETTINGS

        out = {}
        if "mask" in self.cfg.priors:
            out["mask"] = {"extractor": MASK_EXTRACTOR_ID, "settings": MASK_SETTINGS}
        if "caption" in self.cfg.priors:
            enc = self._text_encoder()
            out["caption_embedding"] = {"extractor": enc.extractor_id, "settings": enc.settings}
        return out

    # -- data --------------------------------------------------------------------------------
    def _lq_size(self) -> str:
        # Blind degradation draws its own scale per image, so it always comes back at HR size and
        # is brought to the model's LR size in collate(); bicubic modes can return the LR directly.
        if self.model_config().upsample == "pixelshuffle" and self.cfg.degradation.startswith("bicubic"):
            return "lr"
        return "input"

    def input_side(self) -> int:
        """Side of the model's input: LR (pixelshuffle) or HR (pre_bicubic)."""
        mc = self.model_config()
        return self.cfg.size // mc.scale if mc.upsample == "pixelshuffle" else self.cfg.size

    def train_set(self) -> FaceDataset:
        return FaceDataset(
            FaceDatasetConfig(
                hq_dirs=list(self.cfg.train_dirs),
                size=self.cfg.size,
                degradation=self.cfg.degradation,
                lq_size=self._lq_size(),
                split="all",
                max_items=self.cfg.max_train_items,
                align=self.cfg.template if self.cfg.align_train else "none",
                landmarks_json=self.cfg.landmarks_json if self.cfg.align_train else None,
            )
        )

    def _text_encoder(self):
        if self._encoder is None:
            from ..inference.priors.text_encoder import load_text_encoder

            self._encoder = load_text_encoder(None)
        return self._encoder

    def _captions(self, texts: list[str]):
        from ..inference.priors.bundle_io import concat_embeddings
        from ..inference.priors.text_encoder import encode_texts

        missing = sorted({t for t in texts if t not in self._caption_cache})
        if missing:
            emb = encode_texts(self._text_encoder(), missing)
            for i, t in enumerate(missing):
                self._caption_cache[t] = emb.select([i])
        return concat_embeddings([self._caption_cache[t] for t in texts])

    def _landmarks_for(self, names: list[str]) -> torch.Tensor:
        """[B,5,2] landmarks in HR pixels: detected ones scaled from the source files, else the template."""
        fallback = torch.from_numpy(template_points(self.cfg.template, self.cfg.size)).float()
        if self.cfg.align_train:
            return fallback.expand(len(names), -1, -1)  # aligned faces sit on the template
        scale = self.cfg.size / self.cfg.source_size
        out = []
        for name in names:
            points = next(
                (self._landmarks[k] for k in (name + ".jpg", name + ".png", name) if k in self._landmarks),
                None,
            )
            out.append(torch.tensor(points).float() * scale if points is not None else fallback)
        return torch.stack(out)

    def priors_for(self, names: list[str], labels: list[dict], device) -> dict[str, Any]:
        """Keyword arguments of the model's forward for these faces."""
        from ..inference.priors.captions import template_caption
        from ..inference.priors.landmark_mask import landmark_mask

        kwargs: dict[str, Any] = {}
        if "mask" in self.cfg.priors:
            lm = self._landmarks_for(names)
            kwargs["mask"] = landmark_mask(lm, self.cfg.size, self.cfg.size).to(device)
        if "caption" in self.cfg.priors:
            emb = self._captions([template_caption(lab or None) for lab in labels])
            kwargs["caption"] = type(emb)(
                emb.tokens.to(device), emb.attention_mask.to(device), emb.pooled.to(device)
            )
        return kwargs

    def collate(self, items: list[dict], device: torch.device) -> dict:
        lq = torch.stack([it["lq"] for it in items])
        side = self.input_side()
        if lq.shape[-1] != side:
            lq = resize_bchw(lq, side, side)
        batch = {"hq": torch.stack([it["hq"] for it in items]).to(device), "lq": lq.to(device)}
        batch["priors"] = self.priors_for(
            [it["name"] for it in items], [it["labels"] for it in items], device
        )
        return batch

    # -- loss, validation, export --------------------------------------------------------------
    def training_loss(self, model, batch, step):
        out = model(batch["lq"], **batch["priors"])
        loss = F.l1_loss(out, batch["hq"])
        return loss, {"loss": loss.item()}

    def _val_batch(self) -> dict | None:
        if self._val is None and self.cfg.val_dirs:
            ds = FaceDataset(
                FaceDatasetConfig(
                    hq_dirs=list(self.cfg.val_dirs),
                    size=self.cfg.size,
                    degradation=self.cfg.degradation,
                    lq_size=self._lq_size(),
                    split="all",
                    align=self.cfg.template,
                    source_template=self.cfg.val_source_template,
                    seed=self.cfg.val_seed,
                )
            )
            items = [ds[i] for i in range(len(ds))]
            # Validation faces carry no landmarks file: template points, as for aligned crops at inference.
            for it in items:
                it["name"], it["labels"] = "<template>", {}
            self._val = self.collate(items, torch.device("cpu"))
        return self._val

    def validate(self, model, step, out_dir: Path) -> dict[str, float]:
        from ..inference.metrics.psnr_ssim import psnr, ssim

        val = self._val_batch()
        if val is None:
            return {}
        device = next(model.parameters()).device
        priors = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in val["priors"].items()}
        out = run_batched(model, val["lq"].to(device), priors).cpu()
        hq = val["hq"]
        bicubic = resize_bchw(val["lq"], hq.shape[-2], hq.shape[-1])
        metrics = {
            "psnr": float(psnr(out, hq).mean()),
            "ssim": float(ssim(out, hq).mean()),
            "psnr_bicubic": float(psnr(bicubic, hq).mean()),
            "ssim_bicubic": float(ssim(bicubic, hq).mean()),
        }
        metrics["psnr_gain"] = metrics["psnr"] - metrics["psnr_bicubic"]
        self._save_samples(val["lq"], bicubic, out, hq, out_dir / "samples" / f"step_{step:06d}.png")
        return metrics

    def _save_samples(self, lq, bicubic, out, hq, path: Path) -> None:
        from ..inference.metrics.grid import make_grid

        n = min(self.cfg.samples, out.shape[0])
        size = hq.shape[-1]
        lr_big = F.interpolate(lq[:n], size=(size, size), mode="nearest")
        rows = [[lr_big[i], bicubic[i], out[i], hq[i]] for i in range(n)]
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(rows, ["LR (nearest) | bicubic | LLV-FSR | HR"] + [""] * (n - 1))
        grid.save(path)

    def export(self, model, path: Path, step: int) -> None:
        save_llvfsr(
            model,
            path,
            trained_with=self.trained_with(),
            extra_metadata={"priorface.step": str(step), "priorface.task": json.dumps(asdict(self.cfg))},
        )

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)
