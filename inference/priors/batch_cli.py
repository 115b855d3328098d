"""``priorface priors``: the argparse sub-command, kept free of torch so the CLI starts instantly.

The work happens in :mod:`.batch`, imported when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

DEFAULT_EXTRACTORS = "mask,caption,caption_embedding"


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
        f"description_embedding, or a registered extractor (default: {DEFAULT_EXTRACTORS})",
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
    p.set_defaults(func=run_priors_cli, labels_fn=labels_fn)
    return p


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
    )
    print(
        f"{summary['images']} image(s): extracted {summary['extracted']}, already done {summary['skipped']}; "
        f"index {summary['index']}"
    )
    return 0
