"""``priorface priors``: the argparse sub-command, kept free of torch so the CLI starts instantly.

The work happens in :mod:`.batch`, imported when the command runs. Model-backed extractors
(sam_mask, depth_anything, blip2_caption, llava_description, clip_caption_embedding,
clip_description_embedding) take their model from ``--sam``, ``--depth-model``, ``--caption-model``,
``--describe-model`` and ``--clip-text``: a path, or a name in the ComfyUI-style model folders
(``--models-dir`` / ``--extra-model-paths``, as ``priorface info`` lists them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

DEFAULT_EXTRACTORS = "mask,caption,caption_embedding"
MODEL_EXTRACTOR_NAMES = (
    "sam_mask",
    "depth_anything",
    "blip2_caption",
    "llava_description",
    "clip_caption_embedding",
    "clip_description_embedding",
)
# option dest -> model-folder kind searched for a bare name (inference.model_files)
MODEL_OPTIONS = {
    "sam": "sams",
    "depth_model": "depthanything",
    "caption_model": "LLM",
    "describe_model": "LLM",
    "clip_text": "text_encoders",
}
# Node defaults (nodes/hf_prior_nodes.py, nodes/sam_nodes.py), kept here so --help stays torch-free.
DESCRIBE_PRESETS = ("xpsr_high", "xpsr_low", "llvfsr", "authface_tags", "custom")


def add_priors_parser(
    subparsers, labels_fn: Callable[[str], dict | None] | None = None
) -> argparse.ArgumentParser:
    """Add the ``priors`` sub-command; ``labels_fn`` maps a relative file name to caption labels."""
    p = subparsers.add_parser(
        "priors", help="extract priors (mask, captions, text embeddings, ...) for a folder of aligned faces"
    )
    p.add_argument("dataset", help="folder of aligned face images (searched recursively)")
    p.add_argument(
        "--out", required=True, help="output folder: <relative stem>.safetensors per image + index"
    )
    p.add_argument(
        "--extractors",
        default=DEFAULT_EXTRACTORS,
        help="comma-separated: mask, landmarks, caption, description, caption_embedding, "
        f"description_embedding (embedded); {', '.join(MODEL_EXTRACTOR_NAMES)} (need their model "
        f"option below); or a registered extractor (default: {DEFAULT_EXTRACTORS})",
    )
    p.add_argument(
        "--degradation",
        help="compute the priors from LQ faces degraded by this mode (bicubic_x8, blind, ...), as at inference",
    )
    p.add_argument("--seed", type=int, default=0, help="degradation seed (per file: hash of seed and name)")
    p.add_argument("--size", type=int, help="resize faces to SIZE x SIZE first (as FaceDataset's size)")
    p.add_argument("--template", default="ffhq", help="alignment template of the faces (fallback landmarks)")
    p.add_argument("--text-encoder", help="a transformers text-encoder folder (default: embedded MiniLM)")
    p.add_argument("--batch-size", type=int, default=8, help="faces per extractor call (default 8)")
    p.add_argument("--overwrite", action="store_true", help="redo files that are already complete")
    _add_model_options(p)
    p.set_defaults(func=run_priors_cli, labels_fn=labels_fn)
    return p


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "model extractors", "local model files only (never downloaded); PATH or a name in the model folders"
    )
    g.add_argument("--sam", metavar="PATH", help="segment-anything checkpoint for sam_mask (models/sams)")
    g.add_argument("--depth-model", metavar="DIR", help="Depth-Anything folder for depth_anything")
    g.add_argument("--caption-model", metavar="DIR", help="BLIP-2 folder for blip2_caption (models/LLM)")
    g.add_argument("--describe-model", metavar="DIR", help="LLaVA folder for llava_description (models/LLM)")
    g.add_argument(
        "--clip-text",
        metavar="DIR",
        help="CLIP text encoder folder for clip_*_embedding (models/text_encoders)",
    )
    g.add_argument("--models-dir", help="a ComfyUI models/ folder for names (default: $PRIORFACE_MODELS_DIR)")
    g.add_argument("--extra-model-paths", help="a ComfyUI extra_model_paths.yaml for names")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="transformers models"
    )
    g.add_argument(
        "--sam-mode", default="prompted", choices=("prompted", "automatic"), help="as the SAM node"
    )
    g.add_argument(
        "--sam-selection", default="plausible", choices=("plausible", "score"), help="prompted mode's choice"
    )
    g.add_argument(
        "--caption-max-tokens", type=int, default=30, help="BLIP-2 answer length (node default 30)"
    )
    g.add_argument("--caption-beams", type=int, default=1, help="BLIP-2 beams (1 = greedy, node default)")
    g.add_argument("--caption-prompt", default="", help="BLIP-2 caption prefix (node default: none)")
    g.add_argument("--describe-preset", default="llvfsr", choices=DESCRIBE_PRESETS, help="LLaVA instruction")
    g.add_argument(
        "--describe-instruction", default="", help="LLaVA instruction for --describe-preset custom"
    )
    g.add_argument(
        "--describe-max-tokens", type=int, default=120, help="LLaVA answer length (node default 120)"
    )
    g.add_argument("--describe-beams", type=int, default=1, help="LLaVA beams (1 = greedy, node default)")


def _model_path(value: str | None, kind: str, args: argparse.Namespace):
    """The path as given when it exists or is absolute; else a name looked up in models/<kind>."""
    from pathlib import Path

    if value is None:
        return None
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute() or value.startswith((".", "~")):
        return path  # a missing path is reported by the extractor, naming it
    from ..model_files import headless_locator

    locator = headless_locator(getattr(args, "models_dir", None), getattr(args, "extra_model_paths", None))
    return locator.resolve(kind, value)


def model_options(args: argparse.Namespace):
    """The ``ModelOptions`` of parsed ``priors`` arguments (model names resolved to paths)."""
    from .batch_models import ModelOptions

    paths = {dest: _model_path(getattr(args, dest, None), kind, args) for dest, kind in MODEL_OPTIONS.items()}
    return ModelOptions(
        **paths,
        device=args.device,
        precision=args.precision,
        sam_mode=args.sam_mode,
        sam_selection=args.sam_selection,
        caption_max_tokens=args.caption_max_tokens,
        caption_beams=args.caption_beams,
        caption_prompt=args.caption_prompt,
        describe_preset=args.describe_preset,
        describe_instruction=args.describe_instruction,
        describe_max_tokens=args.describe_max_tokens,
        describe_beams=args.describe_beams,
    )


def run_priors_cli(args: argparse.Namespace) -> int:
    """Run ``priorface priors``; 0 on success."""
    from .batch import extract_priors_for_folder

    summary = extract_priors_for_folder(
        args.dataset,
        args.out,
        extractors=[e.strip() for e in args.extractors.split(",") if e.strip()],
        degradation=args.degradation,
        seed=args.seed,
        size=args.size,
        template=args.template,
        text_encoder=args.text_encoder,
        batch_size=args.batch_size,
        labels_fn=getattr(args, "labels_fn", None),
        overwrite=args.overwrite,
        models=model_options(args),
    )
    print(
        f"{summary['images']} image(s): extracted {summary['extracted']}, already done {summary['skipped']}; "
        f"index {summary['index']}"
    )
    return 0
