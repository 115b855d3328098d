"""AuthFace training data: HQ faces at SDXL resolution with captions, micro-conditioning and eye/mouth boxes.

Items are dicts::

    {"hq": [3,S,S] in [0,1], "caption": str, "original_size": (h, w), "crop_top_left": (top, left),
     "name": relative stem, "index": i, "boxes": [3,4] pixel boxes (left eye, right eye, mouth),
     "lq": [3,S,S] (only with a degradation)}

Images are resized (shorter side to S, antialiased) and centre-cropped to S x S, the SDXL training
recipe; ``original_size`` and ``crop_top_left`` are what SDXL's micro-conditioning expects (size of
the file, crop offset in resized pixels). Determinism follows training/datasets.py: the split is a
hash of the relative name, the flip and degradation of item ``i`` in epoch ``e`` are seeded by
``item_seed(seed, e, i)``.

Captions (``captions``): ``"txt"`` reads ``<image stem>.txt`` beside each image; ``"json"`` reads
``{relative name: text}`` from ``captions_file``; ``"template"`` uses template captions
(UTKFace labels, else "a photo of a face"); ``"authface_tags"`` uses the photography-guided LLaVA
preset (inference/priors/hf_describe.py), generated once by :func:`tag_captions` into a JSON file;
``"none"`` gives "" (stage II conditions on the null prompt).

Landmarks (for the eye/mouth boxes) come from ``landmarks_json`` ({relative name: [[x, y] x5] in
pixels of the file | null}, pixel-centre coordinates, the format of scripts/face_landmarks.py);
faces without an entry use the ``landmark_template`` points (the files are aligned crops).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..inference.face_align import mirror_landmarks, rescale_points
from ..inference.images import list_images, load_image_file, resize_bchw
from .datasets import item_seed, lookup_landmarks, parse_utkface_name, split_of

log = logging.getLogger(__name__)

CAPTION_SOURCES = ("txt", "json", "template", "authface_tags", "none")
# Flipping a face mirrors x and swaps the sides: 5-point order is (eye L, eye R, nose, mouth L, mouth R).


@dataclass
class AuthFaceDataConfig:
    """Everything that defines an AuthFace data set (stored with the run)."""

    dirs: list[str]  # folders of HQ face images (searched recursively)
    resolution: int = 1024  # training side S (SDXL: 1024; a multiple of 8)
    split: str = "all"  # "train", "val" or "all" (by name hash, as training/datasets.py)
    val_fraction: float = 0.0
    seed: int = 0
    captions: str = "txt"  # one of CAPTION_SOURCES
    captions_file: str | None = None  # JSON {relative name: caption} for "json" and "authface_tags"
    caption_fallback: str | None = None  # used where a caption is missing (None: missing is an error)
    hflip: bool = True  # random horizontal flip (eye boxes are swapped accordingly)
    landmarks_json: str | None = None  # {relative name: [[x, y] x5] | null} in file pixels
    landmark_template: str = "ffhq"  # points used for faces without landmarks
    degradation: str | None = None  # a degradations mode (stage II: "blind"); None: no LQ
    degradation_settings: dict = field(default_factory=dict)  # BlindConfig overrides (mode "blind")
    max_items: int | None = None


def _center_crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left): short side resized to ``size``, then a centred square crop."""
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    return rh, rw, (rh - size) // 2, (rw - size) // 2


class AuthFaceDataset(torch.utils.data.Dataset):
    """HQ faces (+ LQ for stage II) with captions, SDXL micro-conditioning and eye/mouth boxes."""

    def __init__(self, config: AuthFaceDataConfig):
        if config.captions not in CAPTION_SOURCES:
            raise ValueError(f"captions must be one of {CAPTION_SOURCES}, got {config.captions!r}")
        if config.resolution < 8 or config.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {config.resolution}")
        if config.degradation is not None:
            from ..inference.degradations import MODES

            if config.degradation not in MODES:
                raise ValueError(f"degradation must be None or one of {MODES}, got {config.degradation!r}")
        self.config = config
        files = list_images(config.dirs)
        if config.split != "all":
            files = [f for f in files if split_of(f[1], config.val_fraction, config.seed) == config.split]
        if config.max_items is not None:
            files = files[: config.max_items]
        if not files:
            raise ValueError(f"no images for split {config.split!r} in {config.dirs}")
        self.files = files
        self.epoch = 0
        self._captions = self._read_captions()
        self._landmarks = json.loads(Path(config.landmarks_json).read_text()) if config.landmarks_json else {}

    def _read_captions(self) -> dict[str, str]:
        cfg = self.config
        if cfg.captions in ("json", "authface_tags"):
            if not cfg.captions_file or not Path(cfg.captions_file).is_file():
                raise FileNotFoundError(
                    f"captions {cfg.captions!r} need a captions_file (JSON {{name: caption}}), got "
                    f"{cfg.captions_file!r}; for 'authface_tags' generate it with tag_captions() first"
                )
            return json.loads(Path(cfg.captions_file).read_text())
        if cfg.captions != "txt":
            return {}
        found, missing = {}, []
        for path, rel in self.files:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                found[rel] = txt.read_text(encoding="utf-8").strip()
            else:
                missing.append(str(txt))
        if missing and cfg.caption_fallback is None:
            raise FileNotFoundError(
                f"{len(missing)} image(s) have no caption file, e.g. {missing[:3]}; write them or set "
                "caption_fallback"
            )
        return found

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips and degradations are returned."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def caption_of(self, index: int) -> str:
        """Caption of item ``index`` from the configured source."""
        path, rel = self.files[index]
        cfg = self.config
        if cfg.captions == "none":
            return ""
        if cfg.captions == "template":
            from ..inference.priors.captions import template_caption

            return template_caption(parse_utkface_name(rel))
        text = self._captions.get(rel)
        if text is None:
            if cfg.caption_fallback is None:
                raise ValueError(f"no caption for {rel} in {cfg.captions_file or 'caption files'}")
            return cfg.caption_fallback
        return text

    def landmarks_of(self, index: int, h: int, w: int) -> np.ndarray:
        """[5,2] landmarks of item ``index`` in file pixels (the template's when none are recorded)."""
        from ..inference.face_align import template_points

        rel = self.files[index][1]
        points = lookup_landmarks(self._landmarks, rel)
        if points is not None:
            return np.asarray(points, dtype=np.float64).reshape(5, 2)
        # Template points are for a square crop; scale each axis for non-square files.
        unit = (template_points(self.config.landmark_template, 1) + 0.5).astype(np.float64)
        return unit * np.array([w, h]) - 0.5

    def __getitem__(self, index: int) -> dict:
        from ..inference.priors.landmark_mask import eye_mouth_boxes

        cfg = self.config
        path, rel = self.files[index]
        image = load_image_file(path).unsqueeze(0)
        h, w = image.shape[-2:]
        size = cfg.resolution
        rh, rw, top, left = _center_crop_box(h, w, size)
        hq = resize_bchw(image, rh, rw)[..., top : top + size, left : left + size].clamp(0.0, 1.0)
        lm = self.landmarks_of(index, h, w)
        lm = rescale_points(lm, rw / w, rh / h) - np.array([left, top])
        seed = item_seed(cfg.seed, self.epoch, index)
        # Its own stream: the degradation draws from default_rng(seed) and must not correlate with it.
        if cfg.hflip and np.random.default_rng([seed, 1]).random() < 0.5:
            hq = hq.flip(-1)
            lm = mirror_landmarks(torch.from_numpy(lm), size).numpy()
        boxes = eye_mouth_boxes(torch.from_numpy(lm).float()[None], size)[0]
        item = {
            "hq": hq[0],
            "caption": self.caption_of(index),
            "original_size": (int(h), int(w)),
            "crop_top_left": (int(top), int(left)),
            "name": str(Path(rel).with_suffix("")),
            "index": index,
            "boxes": boxes,
        }
        if cfg.degradation is not None:
            item["lq"] = self._degrade(hq, seed)[0]
        return item

    def _degrade(self, hq: torch.Tensor, seed: int) -> torch.Tensor:
        from ..inference.degradations import BlindConfig, degrade

        cfg = self.config
        blind = None
        if cfg.degradation == "blind" and cfg.degradation_settings:
            settings = {
                k: tuple(v) if isinstance(v, list) else v for k, v in cfg.degradation_settings.items()
            }
            blind = dataclasses.replace(BlindConfig(), **settings)
        lq, _ = degrade(hq, cfg.degradation, seed, "input", blind_config=blind)
        return lq.clamp(0.0, 1.0)


def collate_faces(items: list[dict], device: torch.device) -> dict:
    """Stack items into a batch: tensors on ``device``, captions and sizes as lists."""
    batch = {
        "hq": torch.stack([it["hq"] for it in items]).to(device),
        "boxes": torch.stack([it["boxes"] for it in items]),
        "captions": [it["caption"] for it in items],
        "original_size": [it["original_size"] for it in items],
        "crop_top_left": [it["crop_top_left"] for it in items],
        "names": [it["name"] for it in items],
    }
    if "lq" in items[0]:
        batch["lq"] = torch.stack([it["lq"] for it in items]).to(device)
    return batch


def tag_captions(
    dirs: list[str], out_json: str | Path, llava_folder: str | Path, batch_size: int = 4, side: int = 672
) -> Path:
    """Write AuthFace photography-tag captions {relative name: tags} for every image (resumable).

    Runs the ``authface_tags`` LLaVA preset on each image resized to ``side`` pixels; images already
    in ``out_json`` are skipped, and the file is rewritten after every mini-batch.
    """
    from ..inference.priors.hf_describe import describe_images, instruction_for
    from ..inference.priors.hf_loading import load_hf_model
    from ..inference.progress import progress_bar
    from ..models.checkpoint import write_atomically

    out_json = Path(out_json)
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    todo = [(p, rel) for p, rel in list_images(dirs) if rel not in done]
    if not todo:
        return out_json
    hf = load_hf_model(llava_folder, families=("llava", "llava_next"))
    instruction = instruction_for("authface_tags")
    with progress_bar(len(todo), "AuthFace tag captions") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = torch.cat([resize_bchw(load_image_file(p).unsqueeze(0), side, side) for p, _ in chunk])
            texts = describe_images(hf, images.clamp(0.0, 1.0), instruction, batch_size=batch_size)
            done.update({rel: text.strip() for (_p, rel), text in zip(chunk, texts, strict=True)})
            blob = json.dumps(done, indent=1, ensure_ascii=False)
            write_atomically(out_json, lambda tmp, blob=blob: Path(tmp).write_text(blob, encoding="utf-8"))
            bar.update(len(chunk))
    return out_json
