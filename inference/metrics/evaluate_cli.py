"""``priorface evaluate``: the argparse sub-command, kept free of torch so the CLI starts instantly.

The work happens in :mod:`.evaluate`, imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

# Metric names accepted by evaluate_folders and --metrics.
METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "lpips", "identity")


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "evaluate", help="PSNR/SSIM/LPIPS/identity of result images against references (CSV + grid)"
    )
    p.add_argument("results", help="folder of restored images")
    p.add_argument("references", help="folder of ground-truth images (matched by file stem)")
    p.add_argument("--csv", required=True, help="where to write the metrics CSV")
    p.add_argument("--grid", help="optional comparison grid image (reference | result per row)")
    p.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help=f"comma-separated subset of {','.join(METRICS)} (default: all)",
    )
    p.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side for PSNR/SSIM")
    p.add_argument("--num-jitters", type=int, default=0, help="dlib descriptor jitters (slower, steadier)")
    p.add_argument("--grid-cell", type=int, default=256, help="longest side of each grid cell in pixels")
    p.add_argument("--models-dir", help="a ComfyUI models/ folder (default: $PRIORFACE_MODELS_DIR)")
    p.add_argument(
        "--extra-model-paths", help="a ComfyUI extra_model_paths.yaml (default: $PRIORFACE_EXTRA_MODEL_PATHS)"
    )
    p.set_defaults(func=run_evaluate_cli)
    return p


def run_evaluate_cli(args: argparse.Namespace) -> int:
    """Run ``priorface evaluate``; exit code 0 when every pair was compared, 1 when some failed."""
    from ..model_files import headless_locator
    from .evaluate import describe_values, evaluate_folders

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    rows = evaluate_folders(
        args.results,
        args.references,
        args.csv,
        grid_path=args.grid,
        metrics=metrics,
        crop_border=args.crop_border,
        locator=headless_locator(args.models_dir, args.extra_model_paths),
        num_jitters=args.num_jitters,
        grid_cell=args.grid_cell,
    )
    mean = rows[-1]
    # The command's own output (not logging): a one-line summary a shell user reads.
    sys.stdout.write(f"{len(rows) - 1} file(s); mean: {describe_values(mean) or '-'}\nwrote {args.csv}\n")
    if args.grid:
        sys.stdout.write(f"wrote {args.grid}\n")
    if mean["error"]:
        sys.stdout.write(f"{mean['error']} (see the error column)\n")
        return 1
    return 0
