"""Face datasets shared by every trainer: HQ folders, on-the-fly or precomputed LQ, stable splits.

Items are dicts of CHW float tensors in [0, 1] plus bookkeeping::

    {"hq": [3,S,S], "lq": [3,s,s], "name": "00001", "index": 7,
     "degradation": "<JSON of drawn parameters>", "labels": {...}, "priors": {...},
     "landmarks": [5,2]}

``landmarks`` are the face's 5 points in HQ pixels (pixel-centre coordinates), carried through
the same resize / alignment / flip as the HQ face; NaN where the file's points are not known
(no ``landmarks_json`` entry, or a detected face without a landmark fit).

Determinism: the split depends only on each file's relative name (a hash), so adding files never
moves existing ones between train and validation; the LQ of item ``i`` in epoch ``e`` is drawn
with seed ``hash(seed, e, i)``, so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..inference.degradations import MODES, degrade
from ..inference.degradations.pipeline import BICUBIC_MODES
from ..inference.face_align import (
    apply_affine,
    estimate_similarity,
    mirror_landmarks,
    rescale_points,
    template_points,
    warp_affine,
)
from ..inference.images import list_images, resize_bchw, save_image_file
from ..inference.images import load_image_file as load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")
_UTKFACE_NAME = re.compile(r"^(\d+)_([01])_([0-4])_")
_UTK_GENDER = ("male", "female")
_UTK_RACE = ("white", "black", "asian", "indian", "other")


@dataclass
class FaceDatasetConfig:
    """Everything that defines a dataset; stored in training checkpoints to rebuild it."""

    hq_dirs: list[str]  # folders of aligned HQ faces (searched recursively)
    size: int = 256  # HQ side in pixels (images are resized, antialiased, to size x size)
    degradation: str = "bicubic_x8"  # a degradations mode, or "precomputed" (read lq_dir)
    lq_size: str = "input"  # "input": LQ resized back to HQ size; "lr": keep the small LQ
    lq_dir: str | None = None  # precomputed LQ faces, matched to HQ by relative path stem
    split: str = "train"  # "train", "val" or "all"
    val_fraction: float = 0.05  # share of files (by name hash) that form the validation split
    seed: int = 0  # seeds LQ synthesis and the split hash
    split_seed: int | None = None  # seeds the split hash instead of seed (same split, other LQ draws)
    align: str = "none"  # "none": files are aligned crops already; or a template name to re-align to
    detector: str = "dlib"  # detector used when align is a template (embedded dlib by default)
    source_template: str | None = None  # files already aligned to this template: reframe without detection
    # {relative file name: [[x, y] x 5] in file pixels | null}: align to the template with these
    # landmarks instead of detecting (fast enough for training); files without landmarks are resized
    landmarks_json: str | None = None
    hflip: bool = False  # random horizontal flip of items (same for HQ and LQ); never in the "val" split
    # [weight, radius]: unsharp-mask the HQ face before degrading it (usm_sharpen), so that a soft
    # source (e.g. UTKFace, measured 2.6x less Laplacian variance than FFHQ) teaches crisper edges
    hq_usm: list[float] | None = None
    priors_dir: str | None = None  # cached priors: <priors_dir>/<relative stem>.safetensors
    max_items: int | None = None  # keep the first N files of the split (after sorting)
    # Keep each file's decoded, aligned HQ face (and its LQ when the degradation is deterministic,
    # i.e. bicubic) in memory after first use: on a GPU the per-item decode / warp / resize, not the
    # network, limits the step rate. Costs ~4 bytes x 3 x size^2 per file (0.2 MB at 128 px).
    cache_items: bool = False
    extra: dict = field(default_factory=dict)  # free-form settings recorded with the dataset


def sharpen_bchw(images: torch.Tensor, weight: float, radius: int) -> torch.Tensor:
    """Unsharp-mask each image of a [B,3,H,W] batch (Real-ESRGAN's soft-masked USM)."""
    from ..inference.degradations.ops import to_chw, to_hwc, usm_sharpen

    return torch.stack([to_chw(usm_sharpen(to_hwc(im), float(weight), int(radius))) for im in images])


def parse_utkface_name(name: str) -> dict | None:
    """Labels from a UTKFace file name ``AGE_GENDER_RACE_DATE.jpg``; None when it does not match."""
    m = _UTKFACE_NAME.match(Path(name).name)
    if not m:
        return None
    age, gender, race = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return {"age": age, "gender": _UTK_GENDER[gender], "race": _UTK_RACE[race]}


def lookup_landmarks(table: dict, rel: str):
    """A file's 5 points in a scripts/face_landmarks.py table: by relative name, without suffix, or file name."""
    for key in (rel, str(Path(rel).with_suffix("")), Path(rel).name):
        if key in table:
            return table[key]
    return None


def split_of(relative_name: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' for a file, from a hash of its relative name (stable as folders grow)."""
    digest = hashlib.sha1(f"{seed}:{relative_name}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if fraction < val_fraction else "train"


def select_files(config: FaceDatasetConfig) -> list[tuple[Path, str]]:
    """(path, relative name) of the files a dataset with ``config`` serves: its split, then max_items."""
    files = list_images(config.hq_dirs)
    if config.split != "all":
        split_seed = config.seed if config.split_seed is None else config.split_seed
        files = [f for f in files if split_of(f[1], config.val_fraction, split_seed) == config.split]
    return files[: config.max_items]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the LQ synthesis of one item in one epoch (independent of worker and batch)."""
    digest = hashlib.sha1(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def unknown_landmarks() -> torch.Tensor:
    """The [5,2] landmarks of a face whose points are not known (all NaN)."""
    return torch.full((5, 2), float("nan"))


def _points_tensor(points: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(points, np.float64).reshape(5, 2), dtype=torch.float32)


class FaceDataset(torch.utils.data.Dataset):
    """HQ/LQ face pairs for training and validation (see module docstring for the item format)."""

    def __init__(self, config: FaceDatasetConfig):
        if config.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {config.split!r}")
        if config.degradation != "precomputed" and config.degradation not in MODES:
            raise ValueError(
                f"degradation must be 'precomputed' or one of {MODES}, got {config.degradation!r}"
            )
        if config.align != "none":
            from ..inference.face_align import TEMPLATES

            if config.align not in TEMPLATES or (
                config.source_template and config.source_template not in TEMPLATES
            ):
                raise ValueError(f"align must be 'none' or one of {sorted(TEMPLATES)}, got {config.align!r}")
        if config.degradation == "precomputed" and not config.lq_dir:
            raise ValueError("degradation 'precomputed' needs lq_dir (a folder of LQ faces)")
        if not 0.0 <= config.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
        self.config = config
        files = select_files(config)
        if not files:
            raise ValueError(f"no images for split {config.split!r} in {config.hq_dirs}")
        self.files = files
        self.epoch = 0
        self._landmarks: dict | None = None
        self._lq_index = self._index_lq() if config.degradation == "precomputed" else {}
        self._cache: dict[int, tuple] = {}

    def _index_lq(self) -> dict[str, Path]:
        by_stem = {str(Path(rel).with_suffix("")): p for p, rel in list_images([self.config.lq_dir])}
        missing = [rel for _p, rel in self.files if str(Path(rel).with_suffix("")) not in by_stem]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} HQ image(s) have no LQ counterpart in {self.config.lq_dir}, e.g. {missing[:3]}"
            )
        return by_stem

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose LQ draws and flips are returned (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        cfg = self.config
        seed = item_seed(cfg.seed, self.epoch, index)
        hq, lq, params, landmarks = self._unflipped(index, seed)
        params = dict(params)
        if cfg.hflip and cfg.split != "val" and np.random.default_rng(seed).random() < 0.5:
            hq, lq = hq.flip(-1), lq.flip(-1)
            landmarks = mirror_landmarks(landmarks, cfg.size)
            params["hflip"] = True
        rel = self.files[index][1]
        stem = str(Path(rel).with_suffix(""))
        item = {
            "hq": hq[0],
            "lq": lq[0],
            "name": stem,
            "index": index,
            "degradation": json.dumps(params),
            "labels": parse_utkface_name(rel) or {},
            "landmarks": landmarks,
        }
        if cfg.priors_dir:
            item["priors"] = self._load_priors(stem)
        return item

    def _unflipped(self, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        """(HQ [1,3,S,S], LQ [1,3,s,s], degradation parameters, landmarks [5,2]) before any flip;
        ``seed`` is the item's seed in the current epoch (item_seed)."""
        hq, lq, params, landmarks = self._cache.get(index) or self._load(index, seed)
        if lq is None:  # drawn anew for every epoch
            lq, params = self._degrade(hq, index, seed)
        elif "seed" in params:  # a fixed LQ; its record still names this epoch's seed
            params = {**params, "seed": seed}
        return hq, lq, params, landmarks

    def _load(self, index: int, seed: int) -> tuple:
        """(HQ, LQ and its parameters when the degradation is fixed else None, landmarks); cached
        with ``cache_items``."""
        cfg = self.config
        hq, landmarks = self.load_hq_and_landmarks(*self.files[index])
        if cfg.hq_usm:
            hq = sharpen_bchw(hq, *cfg.hq_usm)
        lq = params = None
        if cfg.degradation in BICUBIC_MODES or cfg.degradation == "precomputed":
            lq, params = self._degrade(hq, index, seed)
        entry = (hq, lq, params, landmarks)
        if cfg.cache_items:
            self._cache[index] = entry
        return entry

    def _degrade(self, hq: torch.Tensor, index: int, seed: int) -> tuple[torch.Tensor, dict]:
        """The item's LQ drawn with ``seed`` (random degradations) and its parameters."""
        cfg = self.config
        if cfg.degradation == "precomputed":
            stem = str(Path(self.files[index][1]).with_suffix(""))
            lq = load_image(self._lq_index[stem]).unsqueeze(0)
            if cfg.lq_size == "input":
                lq = resize_bchw(lq, cfg.size, cfg.size)
            return lq, {"mode": "precomputed", "file": str(self._lq_index[stem])}
        return degrade(hq, cfg.degradation, seed, cfg.lq_size)

    def prefill(self, workers: int | None = None) -> None:
        """Fill the item cache (``cache_items``) with a thread pool; decoding and warps release the GIL."""
        if not self.config.cache_items:
            return
        from concurrent.futures import ThreadPoolExecutor

        from ..inference.progress import progress_bar

        workers = workers or min(8, os.cpu_count() or 1)
        todo = [i for i in range(len(self)) if i not in self._cache]
        seeds = [item_seed(self.config.seed, self.epoch, i) for i in todo]
        with progress_bar(len(todo), "Caching faces") as bar, ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(self._load, todo, seeds):
                bar.update(1)

    def load_hq(self, path: Path, rel: str) -> torch.Tensor:
        """HQ face as [1,3,size,size]: resized, or aligned to the chosen template."""
        return self.load_hq_and_landmarks(path, rel)[0]

    def load_hq_and_landmarks(self, path: Path, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """HQ face [1,3,size,size] and its 5 points [5,2] in HQ pixels (NaN where unknown)."""
        image = load_image(path).unsqueeze(0)
        cfg = self.config
        if cfg.align == "none":
            return resize_bchw(image, cfg.size, cfg.size), self._resized_landmarks(image, rel)
        if cfg.source_template:
            return self._reframe(image)
        if cfg.landmarks_json:
            return self._align_with_landmarks(image, rel)
        from ..inference.face_pipeline import crop_faces, crop_landmarks

        crops, data = crop_faces(image, cfg.detector, template=cfg.align, size=cfg.size, max_faces=1)
        if not data.faces:
            # Keep the item (the file is still a face picture); say so instead of silently dropping it.
            log.warning("no face found in %s; using the whole image resized", path)
            return resize_bchw(image, cfg.size, cfg.size), unknown_landmarks()
        return crops, crop_landmarks(data)[0]

    def _landmark_table(self) -> dict:
        if self._landmarks is None:
            self._landmarks = json.loads(Path(self.config.landmarks_json).read_text())
        return self._landmarks

    def _resized_landmarks(self, image: torch.Tensor, rel: str) -> torch.Tensor:
        """The file's stored points scaled with the whole-image resize (NaN without a table entry)."""
        points = lookup_landmarks(self._landmark_table(), rel) if self.config.landmarks_json else None
        if points is None:
            return unknown_landmarks()
        h, w = image.shape[-2:]
        return _points_tensor(
            rescale_points(np.asarray(points, np.float64), self.config.size / w, self.config.size / h)
        )

    def _align_with_landmarks(self, image: torch.Tensor, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity-align with the file's stored 5 landmarks (as the face pipeline does at inference)."""
        cfg = self.config
        points = lookup_landmarks(self._landmark_table(), rel)
        if points is None:
            # No face found when the JSON was made: the whole picture, resized.
            return resize_bchw(image, cfg.size, cfg.size), unknown_landmarks()
        affine = estimate_similarity(np.asarray(points, np.float32), template_points(cfg.align, cfg.size))
        return warp_affine(image, affine, (cfg.size, cfg.size)), _points_tensor(apply_affine(points, affine))

    def _reframe(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact change of framing between two templates (no detection, same for every file)."""
        cfg = self.config
        h, w = image.shape[-2:]
        if h != w:
            raise ValueError(f"source_template expects square aligned faces, got {w}x{h}")
        source = template_points(cfg.source_template, h)
        affine = estimate_similarity(source, template_points(cfg.align, cfg.size))
        return warp_affine(image, affine, (cfg.size, cfg.size)), _points_tensor(apply_affine(source, affine))

    def _load_priors(self, stem: str) -> dict[str, torch.Tensor]:
        from ..models.checkpoint import read_checkpoint

        path = Path(self.config.priors_dir) / f"{stem}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no cached priors for {stem!r}: expected {path} (extract priors first)")
        return read_checkpoint(path).content

    def describe(self) -> dict:
        """Config plus size, for logs and checkpoints."""
        return {**asdict(self.config), "items": len(self)}


def precompute_lq(dataset: FaceDataset, out_dir: str | Path) -> Path:
    """Write each item's LQ as PNG (same relative names) plus a JSON of the drawn parameters."""
    from ..inference.progress import progress_bar

    out = Path(out_dir)
    records = {}
    with progress_bar(len(dataset), "Precomputing LQ") as bar:
        for i in range(len(dataset)):
            item = dataset[i]
            save_image_file(item["lq"], out / f"{item['name']}.png")
            records[item["name"]] = json.loads(item["degradation"])
            bar.update(1)
    (out / "degradations.json").write_text(json.dumps(records, indent=1))
    return out
