"""Batch prior extractors backed by real models: SAM mask, Depth-Anything, BLIP-2, LLaVA, CLIP text.

``build_model_extractors(names, options, template)`` turns the chosen names of ``MODEL_EXTRACTORS``
into :class:`ExtraExtractor` objects for :func:`.batch.extract_priors_for_folder`. Each calls the
same library function with the same defaults as its ComfyUI node (nodes/hf_prior_nodes.py,
nodes/sam_nodes.py), so the files record the extractor ids and settings the nodes record, and a
model trained on the cache accepts the nodes' priors at inference.

Model files are local only (nothing is downloaded). Folders are checked when the extractors are
built, so a wrong path fails before any face is read; transformers models are loaded on first use
(a fully done rerun never loads them) and held for the run, one load each. SAM is loaded at build
time: its extractor id names its variant (ViT-B/L/H), which only its weights tell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bundle import PriorBundle

log = logging.getLogger(__name__)


@dataclass
class ExtraExtractor:
    """A prior extractor plugged in by name (e.g. BLIP-2, SAM, depth): faces + labels -> bundle."""

    fn: Callable[..., PriorBundle]  # (images, labels) or, with ``needs``, (images, labels, bundle so far)
    priors: tuple[str, ...]  # prior names it sets
    extractor_id: str | None = None  # id recorded in its sources, checked on resume when known
    needs: tuple[str, ...] = ()  # priors it reads from the bundle (e.g. the caption a text encoder embeds)
    settings: dict | None = None  # entries its sources' "settings" must hold, checked on resume


@dataclass(frozen=True)
class ModelSpec:
    """One model-backed extractor: the option naming its model, the prior it sets, its folder kind."""

    option: str  # field of ModelOptions (and --option on the command line)
    prior: str
    kind: str  # model-folder kind of inference.model_files, for names resolved in models/<kind>
    families: tuple[str, ...]  # accepted transformers families ("sam" for SAM)
    holds: str  # what the option must point at, for error messages


MODEL_EXTRACTORS: dict[str, ModelSpec] = {
    "sam_mask": ModelSpec("sam", "mask", "sams", ("sam",), "a segment-anything checkpoint file"),
    "depth_anything": ModelSpec(
        "depth_model", "depth", "depthanything", ("depth_anything",), "a Depth-Anything folder"
    ),
    "blip2_caption": ModelSpec("caption_model", "caption", "LLM", ("blip2",), "a BLIP-2 folder"),
    "llava_description": ModelSpec(
        "describe_model", "description", "LLM", ("llava", "llava_next"), "a LLaVA 1.5 / LLaVA-NeXT folder"
    ),
    "clip_caption_embedding": ModelSpec(
        "clip_text", "caption_embedding", "text_encoders", ("clip_text",), "a CLIP text encoder folder"
    ),
    "clip_description_embedding": ModelSpec(
        "clip_text", "description_embedding", "text_encoders", ("clip_text",), "a CLIP text encoder folder"
    ),
}
# The nodes' default mini-batch sizes (nodes/hf_prior_nodes.py); they do not change the priors.
_NODE_BATCH = {"caption": 4, "description": 2, "depth": 4, "clip": 8}


@dataclass
class ModelOptions:
    """Model paths and settings; the defaults are the nodes' defaults."""

    sam: str | Path | None = None  # SAM checkpoint file
    depth_model: str | Path | None = None  # Depth-Anything folder
    caption_model: str | Path | None = None  # BLIP-2 folder
    describe_model: str | Path | None = None  # LLaVA folder
    clip_text: str | Path | None = None  # CLIP text encoder folder
    device: str = "auto"
    precision: str = "auto"
    sam_mode: str = "prompted"
    sam_selection: str = "plausible"
    sam_points_per_side: int = 16
    sam_pred_iou_thresh: float = 0.88
    sam_stability_score_thresh: float = 0.95
    caption_max_tokens: int = 30
    caption_beams: int = 1
    caption_prompt: str = ""
    describe_preset: str = "llvfsr"
    describe_instruction: str = ""
    describe_max_tokens: int = 120
    describe_beams: int = 1
    batch_sizes: dict[str, int] = field(default_factory=lambda: dict(_NODE_BATCH))


class _LazyHF:
    """A transformers folder, checked now and loaded on first use, then held for the run."""

    def __init__(self, path: Path, families: tuple[str, ...], what: str, options: ModelOptions):
        from .hf_loading import inspect_folder

        family = inspect_folder(path)[0]  # FileNotFoundError naming the folder when it is missing
        if family not in families:
            raise ValueError(
                f"{what} needs a {' or '.join(families)} model, but {path} holds a {family} model"
            )
        self.path, self.families, self.options = path, families, options
        # Same id as HFModel.extractor_id: family and the folder's name, as the loader nodes give it.
        self.extractor_id = f"{family}:{path.name}"
        self._hf: Any = None

    def get(self):
        """The loaded model (loaded once)."""
        if self._hf is None:
            from .hf_loading import load_hf_model

            # keep_loaded=False: this object holds it; the shared 3-model cache would evict and reload.
            self._hf = load_hf_model(
                self.path, self.families, self.options.device, self.options.precision, keep_loaded=False
            )
            if self._hf.extractor_id != self.extractor_id:
                raise ValueError(
                    f"{self.path} loaded as {self._hf.extractor_id}, expected {self.extractor_id}"
                )
        return self._hf


def _only(bundle: PriorBundle, name: str) -> PriorBundle:
    """A bundle holding just ``name`` (and its source) of ``bundle``."""
    out = PriorBundle(batch_size=bundle.batch_size, mask_labels=bundle.mask_labels)
    return out.with_prior(name, getattr(bundle, name), bundle.sources.get(name, {}))


def _sam_extractor(path: Path, options: ModelOptions, template: str) -> ExtraExtractor:
    from .sam_loading import load_sam
    from .sam_mask import sam_face_masks, with_sam_mask

    if not path.is_file():
        kind = "a folder, not a file" if path.exists() else "missing"
        raise FileNotFoundError(
            f"SAM checkpoint {path} is {kind}; expected a sam_vit_*.pth (or .safetensors) file"
        )
    sam = load_sam(path, device=str(_device(options)))
    knobs = dict(
        mode=options.sam_mode,
        selection=options.sam_selection,
        points_per_side=options.sam_points_per_side,
        pred_iou_thresh=options.sam_pred_iou_thresh,
        stability_score_thresh=options.sam_stability_score_thresh,
    )

    def fn(images, labels):
        # No landmarks given: SAM finds them with dlib (template fallback), as the node does when its
        # priors input holds none.
        return with_sam_mask(None, sam, sam_face_masks(sam, images, None, template=template, **knobs))

    settings = {"mode": options.sam_mode}
    if options.sam_mode == "prompted":
        settings["selection"] = options.sam_selection
    return ExtraExtractor(fn, ("mask",), sam.extractor_id, settings=settings)


def _device(options: ModelOptions) -> torch.device:
    from ..device import resolve_device

    return resolve_device(options.device)


def _hf_extractor(name: str, model: _LazyHF, options: ModelOptions) -> ExtraExtractor:
    from .hf_caption import GenerationOptions, add_captions
    from .hf_clip_text import add_text_embedding
    from .hf_depth import add_depth
    from .hf_describe import add_descriptions, instruction_for

    bs = options.batch_sizes
    if name == "depth_anything":

        def depth(images, labels):
            return add_depth(PriorBundle(images.shape[0]), model.get(), images, bs["depth"])

        return ExtraExtractor(depth, ("depth",), model.extractor_id)
    if name == "blip2_caption":
        gen = GenerationOptions(options.caption_max_tokens, options.caption_beams)
        prompt = options.caption_prompt

        def caption(images, labels):
            return add_captions(PriorBundle(images.shape[0]), model.get(), images, gen, prompt, bs["caption"])

        settings = {**asdict(gen), "prompt": prompt.strip()}
        return ExtraExtractor(caption, ("caption",), model.extractor_id, settings=settings)
    if name == "llava_description":
        gen = GenerationOptions(options.describe_max_tokens, options.describe_beams)
        preset, custom = options.describe_preset, options.describe_instruction
        instruction = instruction_for(preset, custom)  # a bad preset fails now, not after loading

        def describe(images, labels):
            empty = PriorBundle(images.shape[0])
            hf = model.get()
            return add_descriptions(empty, hf, images, preset, custom, "description", gen, bs["description"])[
                0
            ]

        settings = {**asdict(gen), "preset": preset, "instruction": instruction}
        return ExtraExtractor(describe, ("description",), model.extractor_id, settings=settings)
    source = MODEL_EXTRACTORS[name].prior.removesuffix("_embedding")

    def embed(images, labels, bundle):
        return _only(add_text_embedding(bundle, model.get(), source, bs["clip"]), f"{source}_embedding")

    prior = f"{source}_embedding"
    return ExtraExtractor(embed, (prior,), model.extractor_id, needs=(source,), settings={"source": source})


def build_model_extractors(
    names: Sequence[str], options: ModelOptions, template: str = "ffhq"
) -> dict[str, ExtraExtractor]:
    """Extractors for the ``MODEL_EXTRACTORS`` names among ``names``; checks every model path first."""
    chosen = [n for n in dict.fromkeys(names) if n in MODEL_EXTRACTORS]
    for n in chosen:
        spec = MODEL_EXTRACTORS[n]
        if getattr(options, spec.option) is None:
            raise ValueError(
                f"extractor {n!r} needs --{spec.option.replace('_', '-')} PATH ({spec.holds}, or its name "
                f"in models/{spec.kind}); none was given"
            )
    used = {MODEL_EXTRACTORS[n].option for n in chosen}
    for opt in sorted({s.option for s in MODEL_EXTRACTORS.values()} - used):
        if getattr(options, opt) is not None:
            wanted = [n for n, s in MODEL_EXTRACTORS.items() if s.option == opt]
            raise ValueError(
                f"--{opt.replace('_', '-')} was given but none of {wanted} is in the extractors; add it "
                "or drop the option"
            )
    loaded: dict[Path, _LazyHF] = {}  # both CLIP embeddings share one text encoder
    out: dict[str, ExtraExtractor] = {}
    for n in chosen:
        spec = MODEL_EXTRACTORS[n]
        # absolute(), not resolve(): a symlinked model folder keeps its name, as in the loader nodes.
        path = Path(getattr(options, spec.option)).expanduser().absolute()
        if spec.families == ("sam",):
            out[n] = _sam_extractor(path, options, template)
            continue
        if path not in loaded:
            loaded[path] = _LazyHF(path, spec.families, f"extractor {n!r}", options)
        out[n] = _hf_extractor(n, loaded[path], options)
        log.info("%s: %s", n, out[n].extractor_id)
    return out
