"""Measure LLV-FSR weights on the dev faces against bicubic: PSNR/SSIM (RGB and Y) and identity distance.

    python scripts/eval_llvfsr.py weights/llvfsr-x8.safetensors runs/llvfsr-x8-model1/latest.safetensors

The dev faces (../shared/data/faces/dev/ffhq, FFHQ-aligned) are reframed to the
template the weights were trained on, resized to their output size, and degraded as in training
with a fixed seed; each model gets the embedded priors it was trained with (template landmarks,
caption "a photo of a face", or with --captions labels the labels in UTKFace file names, as the
training faces had). Prints one row per method; --grid writes a comparison image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# dev/pairs/hq holds FFHQ 00000-00003 again (same images as dev/ffhq), so only dev/ffhq is used.
DEV = [ROOT.parent / "shared/data/faces/dev/ffhq"]


def dev_dataset(llvfsr, degradation: str, seed: int, align: str = "reframe", faces=None, split: str = "all"):
    """The dev faces as a FaceDataset, framed and degraded as the weights were trained."""
    from priorface.training.datasets import FaceDataset, FaceDatasetConfig

    return FaceDataset(
        FaceDatasetConfig(
            hq_dirs=[str(d) for d in (faces or DEV)],
            size=llvfsr.out_size,
            degradation=degradation,
            lq_size="lr" if degradation.startswith("bicubic") else "input",
            split=split,
            split_seed=0,  # the training jobs' split (train_split "train" holds out "val")
            # "reframe": exact FFHQ -> training-template change of framing; "detect": dlib landmarks;
            # "none": the files' own framing (e.g. UTKFace crops, what the old weights trained on)
            align="none" if align == "none" else llvfsr.template,
            source_template="ffhq" if align == "reframe" else None,
            seed=seed,
        )
    )


def dev_tensors(ds, every: int = 1):
    """(HQ, model input, bicubic baseline) of every ``every``-th face of a dev_dataset.

    Bicubic degradations give the true LR (MATLAB bicubic downsampling) as the model input and its
    MATLAB bicubic upsampling as the baseline, the usual SR convention; blind degradation gives the
    degraded face at HR size for both (the model resizes it to its input size).
    """
    from priorface.inference.degradations.matlab_resize import imresize

    items = [ds[i] for i in range(0, len(ds), every)]
    hq, lq = torch.stack([it["hq"] for it in items]), torch.stack([it["lq"] for it in items])
    bicubic = ds.config.degradation.startswith("bicubic")
    baseline = imresize(lq, hq.shape[-1] / lq.shape[-1]).clamp(0, 1) if bicubic else lq
    return hq, lq, baseline


def dev_set(
    llvfsr,
    degradation: str,
    seed: int,
    align: str = "reframe",
    faces=None,
    every: int = 1,
    split: str = "all",
):
    """(HQ, model input, bicubic baseline) of the dev faces, framed and degraded as in training."""
    return dev_tensors(dev_dataset(llvfsr, degradation, seed, align, faces, split), every)


def dev_captions(ds, every: int = 1) -> list[str]:
    """Template captions of the faces dev_tensors serves (same files, same order) from their file-name labels.

    UTKFace names carry age, gender and race: a face without labels gets "a photo of a face".
    """
    from priorface.inference.priors.captions import template_caption
    from priorface.training.datasets import parse_utkface_name

    return [template_caption(parse_utkface_name(rel)) for _p, rel in ds.files[::every]]


def crop_landmarks_of(images: torch.Tensor, llvfsr, side: int, source: str):
    """None for "template"; else dlib's landmarks on ``images`` (aligned crops), in the frame of a ``side``-px input."""
    if source == "template":
        return None
    from priorface.inference.face_align import rescale_points
    from priorface.inference.priors.landmark_mask import detect_crop_landmarks

    found, ok = detect_crop_landmarks(images, llvfsr.template)
    print(f"landmarks detected on the {source.upper()} faces: {sum(ok)} of {len(ok)} (others: template)")
    return rescale_points(found, side / images.shape[-1])


def paired_difference(a: torch.Tensor, b: torch.Tensor, hq: torch.Tensor) -> str:
    """Per-face PSNR of ``a`` minus ``b``: mean, normal 95% interval of the mean, faces where ``a`` is better."""
    from priorface.inference.metrics.psnr_ssim import psnr

    diff = psnr(a, hq) - psnr(b, hq)
    half = 1.96 * float(diff.std()) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    better = int((diff > 0).sum())
    return f"{float(diff.mean()):+.3f} dB (+-{half:.3f}), better on {better} of {len(diff)}"


def scores(name: str, out: torch.Tensor, hq: torch.Tensor) -> dict:
    """Mean metrics of a method over the dev faces."""
    from priorface.inference.metrics.identity import identity_distance
    from priorface.inference.metrics.psnr_ssim import psnr, ssim

    ids = [identity_distance(out[i], hq[i])[0] for i in range(out.shape[0])]
    return {
        "method": name,
        "psnr": float(psnr(out, hq).mean()),
        "ssim": float(ssim(out, hq).mean()),
        "psnr_y": float(psnr(out, hq, y_channel=True).mean()),
        "ssim_y": float(ssim(out, hq, y_channel=True).mean()),
        "identity": sum(ids) / len(ids),
    }


def print_band_table(names: list[str], outputs: list[torch.Tensor], hq: torch.Tensor) -> None:
    """Per octave band: the HR faces' energy and each method's squared error (x 1e4), and the share recovered."""
    from priorface.inference.metrics.frequency_bands import band_errors, low_pass
    from priorface.inference.metrics.psnr_ssim import psnr

    sides = tuple(hq.shape[-1] // d for d in (8, 4, 2))
    tables = [band_errors(out, hq, sides) for out in outputs]
    print(f"error per band (mean square x 1e4; recovered = 1 - error / {names[0]} error):")
    print(f"{'band':>8s} {'HR energy':>10s} " + " ".join(f"{n[:24]:>24s}" for n in names))
    for i, row in enumerate(tables[0]):
        cells = []
        for t in tables:
            share = 1.0 - t[i]["error"] / row["error"] if row["error"] > 0 else float("nan")
            cells.append(f"{t[i]['error'] * 1e4:9.2f} ({share:+6.1%})")
        print(f"{row['band']:>8s} {row['energy'] * 1e4:10.2f} " + " ".join(f"{c:>24s}" for c in cells))
    # The same PSNR with the top octave removed from every picture: the gain a model could show if the
    # HR faces held no detail finer than half their sampling rate (which no L1-trained model guesses).
    ref = low_pass(hq.double(), sides[-1]).clamp(0, 1)
    base = float(psnr(low_pass(outputs[0].double(), sides[-1]).clamp(0, 1), ref).mean())
    gains = [float(psnr(low_pass(o.double(), sides[-1]).clamp(0, 1), ref).mean()) - base for o in outputs[1:]]
    print(
        f"PSNR gain over {names[0]} without the >{sides[-1]} band: " + ", ".join(f"{g:+.2f}" for g in gains)
    )


def main(argv=None) -> int:
    """Print the dev-set table for the given weights files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--degradation", help="default: the one the first weights were trained with")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--align",
        choices=("reframe", "detect", "none"),
        default="reframe",
        help="reframe FFHQ alignment to the training template, or detect landmarks and align each face",
    )
    parser.add_argument("--faces", nargs="+", help="other HQ face folders instead of the FFHQ dev faces")
    parser.add_argument("--every", type=int, default=1, help="use every N-th face (large folders)")
    parser.add_argument(
        "--split",
        choices=("all", "train", "val"),
        default="all",
        help="with --faces: only the hash split of those folders ('val' = faces a train_split 'train' job never saw)",
    )
    parser.add_argument(
        "--captions",
        choices=("none", "labels"),
        default="none",
        help="caption prior: 'a photo of a face' for all, or each file's labels (UTKFace names) as in training",
    )
    parser.add_argument(
        "--landmarks",
        choices=("template", "hr", "lr"),
        default="template",
        help="mask/description landmarks: the template's, or dlib's on the HR face or on the bicubic-upsampled LR",
    )
    parser.add_argument("--grid", help="write LR | bicubic | each model | HR for every dev face")
    parser.add_argument(
        "--bands",
        action="store_true",
        help="also print each method's error per octave band (<16, 16-32, 32-64, >64 px) next to the HR energy",
    )
    args = parser.parse_args(argv)

    from priorface.inference.llvfsr_restore import load_llvfsr_model, upscale_faces

    models = [load_llvfsr_model(w) for w in args.weights]
    degradation = args.degradation or models[0].task.get("degradation", "bicubic_x8")
    ds = dev_dataset(models[0], degradation, args.seed, args.align, args.faces, args.split)
    hq, lq, baseline = dev_tensors(ds, args.every)
    landmarks = crop_landmarks_of(
        hq if args.landmarks == "hr" else baseline, models[0], lq.shape[-1], args.landmarks
    )
    captions = dev_captions(ds, args.every) if args.captions == "labels" else None
    rows = [scores("bicubic", baseline, hq)]
    outputs = []
    for path, m in zip(args.weights, models, strict=True):
        out = upscale_faces(m, lq, landmarks=landmarks, captions=captions)
        outputs.append(out)
        rows.append(scores(f"{Path(path).parent.name}/{Path(path).name}", out, hq))
    print(
        f"dev faces: {hq.shape[0]}, {hq.shape[-1]} px, degradation {degradation}, seed {args.seed}, "
        f"alignment {args.align}, captions {args.captions}, landmarks {args.landmarks}"
    )
    print(
        f"{'method':48s} {'PSNR':>7s} {'gain':>6s} {'SSIM':>6s} {'PSNR-Y':>7s} {'SSIM-Y':>6s} {'ID dist':>7s}"
    )
    for r in rows:
        gain = r["psnr"] - rows[0]["psnr"]
        print(
            f"{r['method'][:48]:48s} {r['psnr']:7.2f} {gain:+6.2f} {r['ssim']:6.4f} {r['psnr_y']:7.2f} "
            f"{r['ssim_y']:6.4f} {r['identity']:7.4f}"
        )
    if len(outputs) > 1:
        print(f"paired per-face PSNR difference to {rows[-1]['method']} (mean, 95% interval, faces better):")
        for r, out in zip(rows[1:-1], outputs[:-1], strict=True):
            print(f"  {r['method'][:48]:48s} {paired_difference(out, outputs[-1], hq)}")
    if args.bands:
        print_band_table([r["method"] for r in rows], [baseline, *outputs], hq)
    if args.grid:
        from priorface.inference.metrics.grid import make_grid

        size = hq.shape[-1]
        lr = torch.nn.functional.interpolate(lq, size=(size, size), mode="nearest")
        grid = [[lr[i], baseline[i], *[o[i] for o in outputs], hq[i]] for i in range(hq.shape[0])]
        labels = ["LR | bicubic | " + " | ".join(Path(w).parent.name for w in args.weights) + " | HR"]
        make_grid(grid, labels + [""] * (len(grid) - 1)).save(args.grid)
        print(f"grid -> {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
