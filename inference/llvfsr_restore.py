"""LLV-FSR inference: embedded weights, priors for aligned faces, and whole-photo restoration.

Rule for whole photos ("a face never comes out worse than it went in"): the network sees each face
at its input resolution (16 px for llvfsr-x8, 32 px for llvfsr-blind, UTKFace framing). A face
that is larger in the photo than that would lose detail on its way into the network, so it is
left exactly as it is (not even re-pasted) and reported; a face at most 25% larger than the input
resolution (inter-ocular distance) is restored, pasted into the (optionally upscaled) photo and
blended with ``strength`` (1 = model output only). Such models are for small, low-resolution
faces: group photos, thumbnails, distant faces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .face_align import rescale_points, template_points
from .face_types import FaceData
from .images import resize_bchw
from .priors.bundle import PriorBundle, TextEmbedding, check_compatible

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED = {
    "llvfsr-x8": "llvfsr-x8.safetensors",  # bicubic x8, 16 -> 128 (the paper's setting at our size)
    "llvfsr-blind": "llvfsr-blind.safetensors",  # GFPGAN-style blind degradation, 32 -> 128
}
TEMPLATE = "utkface"  # framing the embedded weights were trained on
NO_LABEL_CAPTION = "a photo of a face"


@dataclass
class LLVFSRModel:
    """A loaded network plus what it needs to be fed correctly."""

    model: torch.nn.Module
    trained_with: dict[str, dict]  # prior name -> extractor record, from the weights file
    name: str
    task: dict = field(default_factory=dict)  # training task settings stored in the weights file

    @property
    def out_size(self) -> int:
        """Side of the faces the model produces."""
        return int(self.task.get("size", 128))

    @property
    def template(self) -> str:
        """Face framing the model was trained on."""
        return self.task.get("template", TEMPLATE)


def embedded_weights(name: str) -> Path:
    """Path of an embedded weights file, with a clear error when the package lacks it."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded LLV-FSR weights {name!r}; expected one of {sorted(EMBEDDED)}")
    path = WEIGHTS_DIR / EMBEDDED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded weights {path} are missing from this installation; reinstall PriorFace"
        )
    return path


def load_llvfsr_model(path: str | Path, device: str | torch.device = "cpu") -> LLVFSRModel:
    """Load weights written by the trainer (ours or embedded) into an :class:`LLVFSRModel`."""
    from ..models.llvfsr import load_llvfsr

    loaded = load_llvfsr(path, device)
    task = json.loads(loaded.metadata.get("priorface.task") or "{}")
    return LLVFSRModel(loaded.model, loaded.trained_with, Path(path).stem, task)


def default_priors(
    llvfsr: LLVFSRModel,
    faces: torch.Tensor,
    landmarks: torch.Tensor | None,
    captions: list[str] | None = None,
) -> PriorBundle:
    """The embedded priors the model was trained with, for aligned faces (BCHW at any size).

    ``captions`` (one per face) replace the unlabelled "a photo of a face", e.g. the template
    caption of known labels (``template_caption``), as the training faces had.
    """
    from .priors.embedded import extract_embedded_priors

    wanted = [p for p in ("mask", "caption_embedding", "description_embedding") if p in llvfsr.trained_with]
    if not wanted:
        return PriorBundle(batch_size=faces.shape[0])
    # Priors are drawn at the model's output size, the resolution of its training masks: a mask drawn
    # on the 16-px input would sample other pixel centres than the training masks did.
    size = llvfsr.out_size
    if landmarks is None:
        landmarks = (
            torch.from_numpy(template_points(llvfsr.template, size)).float().expand(faces.shape[0], 5, 2)
        )
    else:
        landmarks = rescale_points(torch.as_tensor(landmarks, dtype=torch.float32), size / faces.shape[-1])
    return extract_embedded_priors(
        resize_bchw(faces.float(), size, size),
        wanted,
        landmarks=landmarks,
        captions=list(captions) if captions is not None else [NO_LABEL_CAPTION] * faces.shape[0],
        template=llvfsr.template,
    )


def _forward_kwargs(llvfsr: LLVFSRModel, bundle: PriorBundle, device) -> dict:
    usable = check_compatible(llvfsr.trained_with, bundle, f"LLV-FSR '{llvfsr.name}'")
    kwargs = {}
    if "mask" in usable:
        kwargs["mask"] = bundle.mask.float().to(device)
    if "depth" in usable:
        kwargs["depth"] = bundle.depth.float().to(device)
    for prior, arg in (("caption_embedding", "caption"), ("description_embedding", "description")):
        if prior in usable:
            e: TextEmbedding = getattr(bundle, prior)
            kwargs[arg] = TextEmbedding(e.tokens.to(device), e.attention_mask.to(device), e.pooled.to(device))
    return kwargs


def upscale_faces(
    llvfsr: LLVFSRModel,
    faces: torch.Tensor,
    priors: PriorBundle | None = None,
    landmarks: torch.Tensor | None = None,
    batch_size: int = 8,
    captions: list[str] | None = None,
) -> torch.Tensor:
    """Super-resolve aligned faces (BCHW 0..1, any square size) to the model's output size."""

    mc = llvfsr.model.config
    size = llvfsr.out_size
    side = size // mc.scale if mc.upsample == "pixelshuffle" else size
    if priors is None:
        priors = default_priors(llvfsr, faces, landmarks, captions)
    if priors.batch_size != faces.shape[0]:
        raise ValueError(
            f"got priors for {priors.batch_size} face(s) but {faces.shape[0]} face(s) to restore"
        )
    device = next(llvfsr.model.parameters()).device
    lr = resize_bchw(faces.float(), side, side)
    kwargs = _forward_kwargs(llvfsr, priors, device)
    return run_batched(llvfsr.model, lr.to(device), kwargs, batch_size).cpu()


def run_batched(model: torch.nn.Module, lr: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """Model output clamped to [0, 1] for ``lr`` and its forward kwargs, ``batch_size`` faces at a time."""
    from .progress import progress_bar

    outs = []
    with progress_bar(lr.shape[0], "LLV-FSR") as bar, torch.no_grad():
        for s in range(0, lr.shape[0], batch_size):
            idx = list(range(s, min(s + batch_size, lr.shape[0])))
            part = {k: (v.select(idx) if isinstance(v, TextEmbedding) else v[idx]) for k, v in kwargs.items()}
            outs.append(model(lr[idx], **part).clamp(0, 1))
            bar.update(len(idx))
    return torch.cat(outs)


def restore_photo(
    llvfsr: LLVFSRModel,
    photos: torch.Tensor,
    upscale: float = 1.0,
    strength: float = 1.0,
    backend: str = "dlib",
    model_path=None,
    color_correction: str = "none",
    **detect_options,
) -> tuple[torch.Tensor, FaceData, list[str]]:
    """Detect, align to the model's template, restore faces that are small enough, paste back.

    Returns (photos, face data, one line per face saying what was done with it).
    """
    from .face_pipeline import crop_faces, crop_landmarks, paste_back

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    size = llvfsr.out_size
    crops, data = crop_faces(photos, backend, model_path, llvfsr.template, size, **detect_options)
    if not data.faces:
        return paste_back(photos, crops, data, upscale=upscale), data, []
    # The network's view of a face: its input crop, whose eye distance is the template's at that size.
    mc = llvfsr.model.config
    input_side = size // mc.scale if mc.upsample == "pixelshuffle" else size
    input_iod = float(np.linalg.norm(np.subtract(*template_points(llvfsr.template, input_side)[:2])))
    todo = [i for i, af in enumerate(data.faces) if af.face.size <= input_iod * 1.25]
    report = [
        f"face {i} (photo {af.face.image_index}, eye distance {af.face.size:.0f} px): "
        + ("restored" if i in todo else f"left as is (sharper than the model's {input_iod:.0f}-px input)")
        for i, af in enumerate(data.faces)
    ]
    # Faces left alone are not pasted at all: pasting their 128-px crop would blur them.
    kept = FaceData(image_sizes=data.image_sizes, faces=[data.faces[i] for i in todo])
    if not todo:
        return paste_back(photos, crops[:0], kept, upscale=upscale), data, report
    out = upscale_faces(llvfsr, crops[todo], landmarks=crop_landmarks(data)[todo])
    restored = strength * out + (1.0 - strength) * crops[todo]
    return (
        paste_back(photos, restored, kept, upscale=upscale, color_correction=color_correction),
        data,
        report,
    )
