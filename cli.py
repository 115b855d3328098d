"""``priorface`` command line: headless entry points that share the node code.

Sub-commands import what they need when they run, so ``priorface --help`` stays instant and the
HTTP batch client never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", help="a ComfyUI models/ folder (default: $PRIORFACE_MODELS_DIR)")
    p.add_argument(
        "--extra-model-paths", help="a ComfyUI extra_model_paths.yaml (default: $PRIORFACE_EXTRA_MODEL_PATHS)"
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the compute device, and where each kind of model file is looked for."""
    import platform

    import torch

    from . import __version__
    from .inference.device import resolve_device, xformers_usable
    from .inference.model_files import describe_folders, headless_locator

    device = resolve_device("auto")
    print(f"priorface {__version__} | python {platform.python_version()} | torch {torch.__version__}")
    print(f"device: {device} | xformers usable: {xformers_usable(device)}")
    print(describe_folders(headless_locator(args.models_dir, args.extra_model_paths)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a legacy pickle of tensors to safetensors (nested dicts flattened with dots)."""
    from .models.checkpoint import read_checkpoint, save_safetensors
    from .models.state_dicts import flatten_tensors

    ckpt = read_checkpoint(args.source)
    tensors = flatten_tensors(ckpt.content)
    if not tensors:
        print(f"error: {args.source} holds no tensors", file=sys.stderr)
        return 2
    save_safetensors(
        tensors, args.target, architecture=args.architecture, config={"converted_from": str(args.source)}
    )
    print(f"wrote {len(tensors)} tensors to {args.target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``priorface`` command."""
    parser = argparse.ArgumentParser(prog="priorface", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, and model folders with the files found")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a .pt/.pth/.ckpt of plain tensors to .safetensors")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--architecture", default="unknown", help="architecture name stored in the metadata")
    p.set_defaults(func=cmd_convert)

    from .inference.metrics.evaluate_cli import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``priorface`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from .models.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
