"""Training LLV-FSR with the generic loop: data, priors, L1 loss, validation, export.

Two sources of priors:

- Embedded (default, nothing downloaded), computed on the fly: the facial-region mask drawn from 5
  landmarks (precomputed for the training faces by ``scripts/face_landmarks.py``; faces without
  detected landmarks, and the validation faces, use the alignment template's points, which is what
  an aligned crop has at inference when no landmarks are passed; with ``align_train``,
  ``mask_landmarks`` "own" carries each face's points through its alignment instead of using the
  template's), MiniLM embeddings of template captions (UTKFace labels; "a photo of a face" without
  labels) and, when ``priors`` names it, of template descriptions (labels plus head pose and mouth
  width read from the same landmarks). The paper computes priors from the LR face at inference;
  here the mask geometry comes from landmarks, which the face pipeline detects on the whole photo,
  not on the 16-px LR crop.
- Cached (``priors_dir``): one prior file per training face, written by ``priorface priors`` with
  any extractors (BLIP-2/LLaVA texts embedded by CLIP, SAM mask, Depth-Anything depth, or the
  embedded ones); see :mod:`.llvfsr_cached_priors`. The model config (mask classes, text width,
  prior branches) and the ``trained_with`` record follow what the files hold, so inference refuses
  priors from other extractors. ``priors`` picks the forward inputs used (mask, depth, caption,
  description).

Cached priors and degradation (a choice): the files must be computed from the degraded face, as
at inference (``--degradation`` = the task's degradation, ``--size`` = its size; anything else is
refused or warned about). They come from ONE fixed degradation per image (the batch's seed),
while the training LQ is drawn afresh every epoch: for the deterministic bicubic modes both are the
same image; for random modes (blind) the priors describe a sibling LQ of the same strength, which
keeps the per-epoch augmentation at the price of a slightly looser prior/input pairing. Validation
faces, by contrast, are degraded exactly as their cached priors were (seed from the prior file).
The training faces are used as they are (resized to ``size``, as ``priorface priors --size`` does),
so ``align_train`` must be off. The validation faces are reframed onto ``template``: write them
with :meth:`LLVFSRTask.write_val_faces` and extract ``val_priors_dir`` from that folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..inference.face_align import mirror_landmarks, template_points
from ..inference.images import resize_bchw
from ..inference.llvfsr_restore import run_batched
from ..models.llvfsr import build_llvfsr, save_llvfsr
from .datasets import FaceDataset, FaceDatasetConfig, select_files, unknown_landmarks
from .llvfsr_cached_priors import FILE_PRIOR, CachedPriors, cached_forward_kwargs, scan_prior_files
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
    # With align_train, the landmarks the mask is drawn from: "template" (every aligned face gets the
    # template's points) or "own" (each face's stored landmarks carried through its alignment, as
    # the whole-photo pipeline passes each crop's detected landmarks at inference)
    mask_landmarks: str = "template"
    # "all" trains on every file; "train" holds out the hash-based 5 % "val" split of train_dirs
    # (FaceDataset's split, seed 0) so that faces of the training framing can be measured unseen
    train_split: str = "all"
    # Unused since FaceDataset scales stored landmarks by each file's own size; kept so job files that
    # name it still load.
    source_size: int = 200
    priors: list[str] = field(default_factory=lambda: ["mask", "caption"])
    preset: str = "small"
    model: dict = field(default_factory=dict)  # LLVFSRConfig overrides
    max_train_items: int | None = None
    val_seed: int = 1234  # fixed degradation of the validation faces
    samples: int = 4  # validation faces shown in the sample grid
    # cached prior files (priorface priors FACES --out DIR ...) instead of the embedded priors;
    # priors then names forward inputs among mask, depth, caption, description
    priors_dir: str | None = None
    val_priors_dir: str | None = None  # the same for the validation faces (see write_val_faces)
    hflip: bool = False  # random horizontal flips of the training faces (mask/landmarks flip with them)
    hq_usm: list[float] | None = None  # [weight, radius]: sharpen training HQ faces (FaceDatasetConfig)
    # weights file (save_llvfsr) a fresh run starts from; its config must equal this task's model
    # config. A resumed run ignores it (the train state holds the weights).
    init_from: str | None = None
    # keep decoded, aligned training faces (and their bicubic LR) in memory, filled before step 1 by
    # a thread pool: on a GPU decoding and warping each face otherwise limit the step rate
    cache_train_items: bool = False


class LLVFSRTask(TrainTask):
    """LLV-FSR on HQ face folders with embedded or cached priors."""

    name = "llvfsr"

    def __init__(self, cfg: LLVFSRTaskConfig):
        if cfg.mask_landmarks not in ("template", "own"):
            raise ValueError(f"mask_landmarks must be 'template' or 'own', got {cfg.mask_landmarks!r}")
        if cfg.train_split not in ("all", "train"):
            raise ValueError(f"train_split must be 'all' or 'train', got {cfg.train_split!r}")
        if cfg.priors_dir:
            _check_cached_config(cfg)
        self.cfg = cfg
        self._cached: CachedPriors | None = None
        self._caption_cache: dict[str, Any] = {}
        self._encoder = None
        self._val = None

    # -- model -------------------------------------------------------------------------------
    def model_config(self):
        """The LLVFSRConfig this task trains."""
        from ..inference.priors.landmark_mask import MASK_LABELS
        from ..models.llvfsr import llvfsr_config

        if self.cfg.priors_dir:
            return llvfsr_config(self.cfg.preset, **self._cached_overrides())
        overrides = {"mask_classes": len(MASK_LABELS), "text_dim": 384, **self.cfg.model}
        return llvfsr_config(self.cfg.preset, **overrides)

    def _cached_overrides(self) -> dict:
        """cfg.model plus what the prior files impose (a conflicting value is an error)."""
        from ..models.llvfsr_blocks import PRIOR_NAMES

        cached = self._cache()
        imposed = {}
        if "mask" in self.cfg.priors:
            imposed["mask_classes"] = cached.mask_classes
        if {"caption", "description"} & set(self.cfg.priors):
            imposed["text_dim"] = cached.text_dim
        for key, value in imposed.items():
            if key in self.cfg.model and self.cfg.model[key] != value:
                raise ValueError(
                    f"model.{key} is {self.cfg.model[key]} but the prior files in {cached.folder} hold "
                    f"{value}; leave it out (it follows the files)"
                )
        # Branches of priors the run does not use are not built (no untrained weights in the file).
        unused = [p for p in PRIOR_NAMES if p not in self.cfg.priors]
        return {"disabled_priors": unused, **self.cfg.model, **imposed}

    def _used_priors(self) -> list[str]:
        """Forward inputs fed from the cache: selected and with a branch in the model."""
        enabled = self.model_config().enabled_priors
        return [p for p in self.cfg.priors if p in enabled]

    def _cache(self) -> CachedPriors:
        """What the training prior files hold (scanned once; raises on missing or mixed files)."""
        if self._cached is None:
            # The files the training FaceDataset takes, without building it: building it asks for the
            # model config, which needs this scan.
            files = select_files(
                FaceDatasetConfig(
                    hq_dirs=list(self.cfg.train_dirs),
                    split=self.cfg.train_split,
                    max_items=self.cfg.max_train_items,
                )
            )
            stems = [str(Path(rel).with_suffix("")) for _p, rel in files]
            self._cached = scan_prior_files(
                self.cfg.priors_dir, stems, list(self.cfg.priors), self.cfg.degradation, self.cfg.size
            )
            log.info(
                "cached priors from %s: %s",
                self.cfg.priors_dir,
                {n: s["extractor"] for n, s in self._cached.sources.items()},
            )
        return self._cached

    def build_model(self) -> torch.nn.Module:
        config = self.model_config()
        model = build_llvfsr(config)
        if self.cfg.init_from:
            from ..models.llvfsr import load_llvfsr

            start = load_llvfsr(self.cfg.init_from).model
            have, want = start.config.to_dict(), config.to_dict()
            if have != want:
                diff = {
                    k: (have.get(k), want.get(k)) for k in sorted(have | want) if have.get(k) != want.get(k)
                }
                raise ValueError(
                    f"init_from {self.cfg.init_from} has another model config than this task "
                    f"(file value, task value): {diff}"
                )
            model.load_state_dict(start.state_dict())
        return model

    def trained_with(self) -> dict[str, dict]:
        """Provenance of each prior the model sees, stored in its weights file."""
        from ..inference.priors.landmark_mask import MASK_EXTRACTOR_ID, MASK_SETTINGS

        if self.cfg.priors_dir:
            sources = self._cache().sources
            return {FILE_PRIOR[p]: dict(sources[FILE_PRIOR[p]]) for p in self._used_priors()}
        out = {}
        if "mask" in self.cfg.priors:
            out["mask"] = {"extractor": MASK_EXTRACTOR_ID, "settings": MASK_SETTINGS}
        for text in ("caption", "description"):
            if text in self.cfg.priors:
                enc = self._text_encoder()
                out[f"{text}_embedding"] = {"extractor": enc.extractor_id, "settings": enc.settings}
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
        if self.cfg.priors_dir:
            self._cache()  # every face has a complete, consistent prior file, or stop now
        dataset = self._dataset(self.cfg.priors_dir)
        dataset.prefill()
        return dataset

    def _dataset(self, priors_dir: str | None) -> FaceDataset:
        return FaceDataset(
            FaceDatasetConfig(
                hq_dirs=list(self.cfg.train_dirs),
                size=self.cfg.size,
                degradation=self.cfg.degradation,
                lq_size=self._lq_size(),
                split=self.cfg.train_split,
                max_items=self.cfg.max_train_items,
                align=self.cfg.template if self.cfg.align_train else "none",
                landmarks_json=self.cfg.landmarks_json,  # aligns (align_train) or only places the mask
                priors_dir=priors_dir,
                hflip=self.cfg.hflip,
                hq_usm=self.cfg.hq_usm,
                cache_items=self.cfg.cache_train_items,
            )
        )

    def _text_encoder(self):
        if self._encoder is None:
            from ..inference.priors.text_encoder import load_text_encoder

            self._encoder = load_text_encoder(None)
        return self._encoder

    def _embed_texts(self, texts: list[str]):
        from ..inference.priors.bundle_io import concat_embeddings
        from ..inference.priors.text_encoder import encode_texts

        missing = sorted({t for t in texts if t not in self._caption_cache})
        if missing:
            emb = encode_texts(self._text_encoder(), missing)
            for i, t in enumerate(missing):
                self._caption_cache[t] = emb.select([i])
        return concat_embeddings([self._caption_cache[t] for t in texts])

    def template_landmarks(self) -> torch.Tensor:
        """[5,2] template points of the training framing, in HR pixels."""
        return torch.from_numpy(template_points(self.cfg.template, self.cfg.size)).float()

    def batch_landmarks(self, items: list[dict]) -> torch.Tensor:
        """[B,5,2] mask landmarks in HR pixels: each face's own (as FaceDataset carried them) or the template's.

        With ``align_train`` and ``mask_landmarks`` "template" every face gets the template (what it
        was warped onto); faces whose points are unknown get it too. Flipped items get it mirrored.
        """
        template = self.template_landmarks()
        use_template = self.cfg.align_train and self.cfg.mask_landmarks == "template"
        rows = []
        for it in items:
            own = it.get("landmarks")
            if use_template or own is None or not bool(torch.isfinite(own).all()):
                flipped = bool(json.loads(it["degradation"]).get("hflip"))
                own = mirror_landmarks(template, self.cfg.size) if flipped else template
            rows.append(own)
        return torch.stack(rows)

    def priors_for(self, labels: list[dict], device, landmarks: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments of the model's forward for these faces (``landmarks`` [B,5,2]; None: the template)."""
        from ..inference.priors.captions import template_caption, template_description
        from ..inference.priors.landmark_mask import landmark_mask

        kwargs: dict[str, Any] = {}
        lm = self.template_landmarks().repeat(len(labels), 1, 1) if landmarks is None else landmarks
        if "mask" in self.cfg.priors:
            kwargs["mask"] = landmark_mask(lm.to(device), self.cfg.size, self.cfg.size)  # drawn on the device
        texts = {}
        if "caption" in self.cfg.priors:
            texts["caption"] = [template_caption(lab or None) for lab in labels]
        if "description" in self.cfg.priors:
            # Who (labels) and the head pose / mouth width read from the landmarks, as at inference.
            texts["description"] = template_description(lm, [lab or None for lab in labels])
        for name, batch_texts in texts.items():
            emb = self._embed_texts(batch_texts)
            kwargs[name] = type(emb)(
                emb.tokens.to(device), emb.attention_mask.to(device), emb.pooled.to(device)
            )
        return kwargs

    def collate(self, items: list[dict], device: torch.device) -> dict:
        lq = torch.stack([it["lq"] for it in items])
        side = self.input_side()
        if lq.shape[-1] != side:
            lq = resize_bchw(lq, side, side)
        batch = {"hq": torch.stack([it["hq"] for it in items]).to(device), "lq": lq.to(device)}
        if self.cfg.priors_dir:
            batch["priors"] = cached_forward_kwargs(
                [it["priors"] for it in items], self._used_priors(), device
            )
            return batch
        batch["priors"] = self.priors_for([it["labels"] for it in items], device, self.batch_landmarks(items))
        return batch

    # -- loss, validation, export --------------------------------------------------------------
    def training_loss(self, model, batch, step):
        out = model(batch["lq"], **batch["priors"])
        loss = F.l1_loss(out, batch["hq"])
        return loss, {"loss": loss.item()}

    def _val_dataset(self, priors_dir: str | None = None) -> FaceDataset:
        return FaceDataset(
            FaceDatasetConfig(
                hq_dirs=list(self.cfg.val_dirs),
                size=self.cfg.size,
                degradation=self.cfg.degradation,
                lq_size=self._lq_size(),
                split="all",
                align=self.cfg.template,
                source_template=self.cfg.val_source_template,
                seed=self.cfg.val_seed,
                priors_dir=priors_dir,
            )
        )

    def write_val_faces(self, out_dir: str | Path) -> Path:
        """Write the validation HQ faces, framed as the model sees them, as PNG: extract val_priors_dir from them."""
        from ..inference.images import save_image_file

        if not self.cfg.val_dirs:
            raise ValueError("this task has no val_dirs: no validation faces to write")
        ds, out = self._val_dataset(), Path(out_dir)
        for path, rel in ds.files:
            save_image_file(ds.load_hq(path, rel)[0], out / f"{Path(rel).with_suffix('').as_posix()}.png")
        return out

    def _cached_val_items(self) -> list[dict]:
        """Validation items whose LQ is the exact degradation their cached priors were computed from."""
        from ..inference.degradations import degrade
        from ..inference.priors.batch import file_seed
        from ..inference.priors.bundle_io import read_prior_header

        ds = self._val_dataset(self.cfg.val_priors_dir)
        stems = [str(Path(rel).with_suffix("")) for _p, rel in ds.files]
        val = scan_prior_files(
            self.cfg.val_priors_dir, stems, list(self.cfg.priors), self.cfg.degradation, self.cfg.size
        )
        train = self._cache()
        if json.dumps(val.sources, sort_keys=True) != json.dumps(train.sources, sort_keys=True):
            raise ValueError(
                f"validation priors in {self.cfg.val_priors_dir} come from {val.sources}, the training "
                f"priors in {self.cfg.priors_dir} from {train.sources}; extract both with the same extractors"
            )
        items = []
        for i, stem in enumerate(stems):
            item = ds[i]
            extra = read_prior_header(Path(self.cfg.val_priors_dir) / f"{stem}.safetensors")[1].get(
                "extra", {}
            )
            seed = file_seed(extra.get("run", {}).get("seed") or 0, extra.get("source", ""))
            item["lq"] = degrade(item["hq"][None], self.cfg.degradation, seed, self._lq_size())[0][0]
            items.append(item)
        return items

    def _val_batch(self) -> dict | None:
        if self._val is None and self.cfg.val_dirs and self.cfg.priors_dir:
            self._val = self.collate(self._cached_val_items(), torch.device("cpu"))
        if self._val is None and self.cfg.val_dirs:
            ds = self._val_dataset()
            items = [ds[i] for i in range(len(ds))]
            # Validation faces get the template's points (as aligned crops at inference without
            # landmarks; the same mask in every run's curve) and no labels.
            for it in items:
                it["labels"], it["landmarks"] = {}, unknown_landmarks()
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


def _check_cached_config(cfg: LLVFSRTaskConfig) -> None:
    """Settings that cannot work with cached priors, refused before anything is loaded."""
    unknown = sorted(set(cfg.priors) - set(FILE_PRIOR))
    if unknown or not cfg.priors:
        raise ValueError(f"priors must be some of {list(FILE_PRIOR)} with priors_dir, got {cfg.priors}")
    if cfg.align_train:
        raise ValueError(
            "align_train must be false with priors_dir: the prior files are computed from the training "
            "files as they are (resized), not from faces warped with landmarks"
        )
    if cfg.val_dirs and not cfg.val_priors_dir:
        raise ValueError(
            "val_dirs with priors_dir needs val_priors_dir: cached priors of the validation faces "
            "(write the faces with LLVFSRTask.write_val_faces, then run priorface priors on that folder)"
        )
