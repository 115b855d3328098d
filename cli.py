"""``priorface`` command line: headless entry points that share the node code.

Sub-commands import what they need when they run, so ``priorface --help`` stays instant and the
HTTP batch client never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import signal
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
    """Convert a legacy pickle to safetensors: official VSPBFR files by model, others flattened with dots."""
    from .models.checkpoint import save_safetensors
    from .models.state_dicts import flatten_tensors
    from .models.vspbfr_checkpoints import convert_official_to_safetensors, read_vspbfr_file

    # The VSPBFR allow-list adds only argparse.Namespace (the official files' options) to plain tensors.
    ckpt = read_vspbfr_file(args.source)
    if _is_official_vspbfr(ckpt.content):
        out = convert_official_to_safetensors(args.source, args.target)
        print(f"wrote the official VSPBFR network to {out} (keys checked strictly)")
        return 0
    tensors = flatten_tensors(ckpt.content)
    if not tensors:
        print(f"error: {args.source} holds no tensors", file=sys.stderr)
        return 2
    save_safetensors(
        tensors, args.target, architecture=args.architecture, config={"converted_from": str(args.source)}
    )
    print(f"wrote {len(tensors)} tensors to {args.target}")
    return 0


def _is_official_vspbfr(content) -> bool:
    """The three official VSPBFR files: e4e ``state_dict`` with encoder./decoder. keys, ``att_mapper``, ``g_ema``."""
    if not isinstance(content, dict):
        return False
    if "att_mapper" in content or "g_ema" in content:
        return True
    sd = content.get("state_dict")
    return isinstance(sd, dict) and any(str(k).startswith("encoder.") for k in sd) and any(
        str(k).startswith("decoder.") for k in sd
    )


def _photos(source: str) -> list:
    from pathlib import Path

    from .inference.images import IMAGE_SUFFIXES

    src = Path(source)
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"no such photo or folder: {src}")


def _detector(value: str) -> tuple[str, str | None]:
    """'dlib' (embedded) or the path of a RetinaFace .pth / YuNet .onnx file."""
    if value == "dlib":
        return "dlib", None
    return ("yunet" if value.lower().endswith(".onnx") else "retinaface"), value


def cmd_faces(args: argparse.Namespace) -> int:
    """Detect, align and crop every face, draw a preview, and paste the crops back (round trip)."""
    import json
    from pathlib import Path

    from .inference.face_pipeline import crop_faces, draw_detections, paste_back
    from .inference.images import load_image_file, save_image_file

    out = Path(args.output)
    backend, model_path = _detector(args.detector)
    summary = []
    for photo in _photos(args.source):
        image = load_image_file(photo).unsqueeze(0)
        crops, data = crop_faces(image, backend, model_path, args.template, args.size)
        save_image_file(draw_detections(image, data)[0], out / f"{photo.stem}_detections.png")
        for n in range(crops.shape[0]):
            save_image_file(crops[n], out / f"{photo.stem}_face{n:02d}.png")
        pasted = paste_back(image, crops, data, upscale=args.upscale)
        error = float((paste_back(image, crops, data) - image).abs().mean()) * 255
        save_image_file(pasted[0], out / f"{photo.stem}_pasted.png")
        faces = [
            {
                "box": [round(float(v), 1) for v in f.face.box],
                "score": round(f.face.score, 3),
                "landmarks": [[round(float(v), 1) for v in pt] for pt in f.face.landmarks],
            }
            for f in data.faces
        ]
        summary.append({"photo": str(photo), "faces": faces, "round_trip_mean_error_255": round(error, 3)})
        print(f"{photo.name}: {len(faces)} face(s), round-trip mean error {error:.3f}/255")
    (out / "faces.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote crops, previews and pasted photos for {len(summary)} photo(s) to {out}")
    return 0


def _demo_photo(out_dir):
    """scikit-image's astronaut photograph shrunk to a thumbnail (faces of ~7 px eye distance).

    The embedded LLV-FSR weights restore small, low-resolution faces; the full-size photo's face is
    already sharper than the network's input and would be left alone. A bicubic upscale is saved
    beside it for comparison.
    """
    try:
        from skimage import data
    except ImportError:
        raise FileNotFoundError(
            "no photo given; pass a photo or folder (or install scikit-image for a demo photo)"
        ) from None
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    full = Image.fromarray(data.astronaut())
    small = full.resize((full.width // 6, full.height // 6), Image.BICUBIC, reducing_gap=3.0)
    path = out_dir / "astronaut_small.png"
    small.save(path)
    small.resize((small.width * 6, small.height * 6), Image.BICUBIC).save(
        out_dir / "astronaut_small_bicubic.png"
    )
    return path


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore every face of photos with the embedded LLV-FSR weights (or a weights file)."""
    from pathlib import Path

    from .inference.images import load_image_file, save_image_file
    from .inference.llvfsr_restore import EMBEDDED, embedded_weights, load_llvfsr_model, restore_photo

    out = Path(args.output)
    photos = _photos(args.source) if args.source else [_demo_photo(out)]
    upscale = args.upscale if args.upscale is not None else (2.0 if args.source else 6.0)
    weights = embedded_weights(args.weights) if args.weights in EMBEDDED else Path(args.weights)
    llvfsr = load_llvfsr_model(weights)
    backend, model_path = _detector(args.detector)
    for photo in photos:
        image = load_image_file(photo).unsqueeze(0)
        # Small photos have tiny faces: dlib's HOG then looks at a 4x or 8x enlarged image (faces from ~10 px).
        side = min(image.shape[-2:])
        upsample = args.detect_upsample or (3 if side < 200 else 2 if side < 500 else 1)
        detect = {"upsample": upsample} if backend == "dlib" else {}
        restored, _data, report = restore_photo(
            llvfsr,
            image,
            upscale=upscale,
            strength=args.strength,
            backend=backend,
            model_path=model_path,
            color_correction=args.color_correction,
            **detect,
        )
        target = out / f"{photo.stem}_restored.png"
        save_image_file(restored[0], target)
        print(f"{photo.name} -> {target}: " + ("; ".join(report) if report else "no face found"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train or resume a model from a JSON job file (see configs/)."""
    import torch

    from .training.run_config import run_job

    if args.threads:
        torch.set_num_threads(args.threads)

    def _stop(signum, _frame):
        # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: checkpoint first, then exit.
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    summary = run_job(args.config, args.out, resume=not args.restart, steps=args.steps)
    print(f"finished at step {summary['step']} ({summary['seconds'] / 60:.1f} min): {summary['validation']}")
    return 0


def _utkface_labels(name: str):
    from .training.datasets import parse_utkface_name

    return parse_utkface_name(name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``priorface`` command."""
    parser = argparse.ArgumentParser(prog="priorface", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, and model folders with the files found")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "restore", help="restore every face of photos with LLV-FSR (embedded weights by default)"
    )
    p.add_argument(
        "source", nargs="?", help="a photo or a folder (default: a thumbnail of scikit-image's astronaut)"
    )
    p.add_argument(
        "-o", "--output", default="outputs/restored", help="output folder (default: outputs/restored)"
    )
    p.add_argument(
        "--weights", default="llvfsr-blind", help="llvfsr-blind, llvfsr-x8, or a .safetensors path"
    )
    p.add_argument(
        "--detector", default="dlib", help="'dlib' (embedded) or a RetinaFace .pth / YuNet .onnx path"
    )
    p.add_argument(
        "--upscale", type=float, help="upscale factor of the whole photo (default 2; demo photo 6)"
    )
    p.add_argument("--strength", type=float, default=1.0, help="1 = restored faces, 0 = original faces")
    p.add_argument(
        "--detect-upsample", type=int, help="dlib upsampling (default 2 for photos under 500 px, else 1)"
    )
    p.add_argument("--color-correction", default="wavelet", choices=["none", "adain", "wavelet"])
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("faces", help="detect, align and crop faces; preview; paste back (round trip)")
    p.add_argument("source", help="a photo or a folder of photos")
    p.add_argument("-o", "--output", default="outputs/faces", help="output folder (default: outputs/faces)")
    p.add_argument(
        "--detector", default="dlib", help="'dlib' (embedded) or a RetinaFace .pth / YuNet .onnx path"
    )
    p.add_argument("--template", default="ffhq", choices=["ffhq", "utkface"], help="alignment template")
    p.add_argument("--size", type=int, default=512, help="side of the aligned crops (default 512)")
    p.add_argument("--upscale", type=float, default=1.0, help="upscale factor of the pasted photo")
    p.set_defaults(func=cmd_faces)

    p = sub.add_parser("train", help="train or resume a model from a JSON job file (configs/)")
    p.add_argument("config", help="job file, e.g. configs/llvfsr/x8.json")
    p.add_argument("--out", help="run folder (default: the job's out_dir)")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert a .pt/.pth/.ckpt of plain tensors to .safetensors")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--architecture", default="unknown", help="architecture name stored in the metadata")
    p.set_defaults(func=cmd_convert)

    from .client.batch_cli import add_batch_parser
    from .inference.metrics.evaluate_cli import add_evaluate_parser
    from .inference.priors.batch_cli import add_priors_parser

    add_batch_parser(sub)
    add_evaluate_parser(sub)
    add_priors_parser(sub, labels_fn=_utkface_labels)
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
