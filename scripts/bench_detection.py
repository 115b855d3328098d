"""Face detection benchmark: recall, speed and landmark agreement of each backend on real photos.

Usage (from the repository root, with the shared data and models next to it):
    python scripts/bench_detection.py [--shared ../shared] [--fit-dlib]

Prints, per backend: faces found in each unaligned photo of faces/whole/, the fraction of aligned
images (dev/ffhq, dev/pairs/lq, real-lq) with at least one face, seconds per image, and the mean
landmark error against RetinaFace normalised by inter-ocular distance. ``--fit-dlib`` refits the
dlib -> RetinaFace nose/mouth coefficients on lfw-identity/ and prints them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from priorface.inference import face_detection as fd

ALIGNED_SETS = ("dev/ffhq", "dev/pairs/lq", "real-lq")
SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image(path: Path) -> torch.Tensor:
    """RGB file -> [1,3,H,W] float 0..1."""
    rgb = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def images_in(folder: Path) -> list[Path]:
    """Image files of a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []


def backends(models: Path) -> dict[str, dict]:
    """Backend configurations to compare (those whose model file exists)."""
    configs = {"dlib": {"backend": "dlib"}}
    for name, file, backend in (
        ("retinaface", "mobilenet0.25_Final.pth", "retinaface"),
        ("yunet_s", "yunet_s_640_640.onnx", "yunet"),
        ("yunet_n", "yunet_n_640_640.onnx", "yunet"),
    ):
        if (models / file).is_file():
            configs[name] = {"backend": backend, "model_path": models / file}
    return configs


def run(paths: list[Path], config: dict) -> tuple[list[list], float]:
    """Detect faces in each file; returns per-image face lists and seconds per image."""
    fd.detect_faces(torch.zeros(1, 3, 1024, 1024), **config)  # load and warm up outside the timing
    found, seconds = [], 0.0
    for p in paths:
        image = load_image(p)
        start = time.perf_counter()
        found.append(fd.detect_faces(image, **config))
        seconds += time.perf_counter() - start
    return found, seconds / max(len(paths), 1)


def landmark_errors(reference: list[list], other: list[list]) -> list[np.ndarray]:
    """Per matched face, the 5 landmark errors / reference inter-ocular distance."""
    errors = []
    for ref_faces, faces in zip(reference, other, strict=True):
        for ref in ref_faces:
            centre = ref.landmarks[:2].mean(0)
            near = [f for f in faces if np.linalg.norm(f.landmarks[:2].mean(0) - centre) < 0.5 * ref.size]
            if near and ref.size > 0:
                best = min(near, key=lambda f: np.linalg.norm(f.landmarks[:2].mean(0) - centre))
                errors.append(np.linalg.norm(best.landmarks - ref.landmarks, axis=1) / ref.size)
    return errors


def fit_dlib(shared: Path) -> None:
    """Least-squares fit of the dlib nose/mouth estimate to RetinaFace landmarks on LFW faces."""
    model = shared / "models/facedetection/mobilenet0.25_Final.pth"
    dlib_backend = fd.get_backend("dlib")
    rows, targets = [], []
    for p in images_in(shared / "data/faces/lfw-identity"):
        image = load_image(p)
        ref = fd.detect_faces(image, "retinaface", model, max_faces=1)
        rgb = np.ascontiguousarray((image[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        rects = dlib_backend.detector(rgb, 1)
        if not ref or not rects:
            continue
        rect = max(rects, key=lambda r: r.area())
        pts = np.array([[q.x, q.y] for q in dlib_backend.predictor(rgb, rect).parts()], np.float64)
        left, right = pts[2:4].mean(0), pts[0:2].mean(0)
        if np.linalg.norm((left + right) / 2 - ref[0].landmarks[:2].mean(0)) > 0.5 * ref[0].size:
            continue  # the two detectors found different faces
        mid, iod = (left + right) / 2, np.linalg.norm(right - left)
        u = (right - left) / iod
        v = np.array([-u[1], u[0]])
        rel = pts[4] - mid
        rows.append([1.0, rel @ u / iod, rel @ v / iod])
        t = (ref[0].landmarks[2:] - mid) / iod
        targets.append(np.stack([t @ u, t @ v], axis=1).reshape(-1))
    a, b = np.array(rows), np.array(targets)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)  # [3 features, 6 outputs]
    fit = coef.T.reshape(3, 2, 3)
    residual = np.linalg.norm((a @ coef - b).reshape(-1, 3, 2), axis=2).mean(0)
    print(
        f"fitted on {len(rows)} LFW faces; mean residual / IOD (nose, mouth_l, mouth_r): {residual.round(3)}"
    )
    print("_DLIB_FIT =", np.array2string(fit.round(3), separator=", "))


def main() -> None:
    """Parse arguments and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--fit-dlib", action="store_true", help="refit the dlib nose/mouth estimate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    faces_dir, models = args.shared / "data/faces", args.shared / "models/facedetection"
    if args.fit_dlib:
        fit_dlib(args.shared)
        return
    configs = backends(models)
    whole = images_in(faces_dir / "whole")
    results = {name: run(whole, cfg) for name, cfg in configs.items()}
    print(f"\nFaces found per photo in {faces_dir / 'whole'} (no ground-truth counts):")
    print(f"{'photo':36s} {'size':>10s} " + " ".join(f"{n:>10s}" for n in configs))
    for i, p in enumerate(whole):
        w, h = Image.open(p).size
        counts = " ".join(f"{len(results[n][0][i]):>10d}" for n in configs)
        print(f"{p.name:36s} {f'{w}x{h}':>10s} {counts}")
    totals = " ".join(f"{sum(len(f) for f in results[n][0]):>10d}" for n in configs)
    print(f"{'total':36s} {'':>10s} {totals}")
    print(f"{'seconds / image':36s} {'':>10s} " + " ".join(f"{results[n][1]:>10.3f}" for n in configs))

    print("\nAligned sets: fraction of images with >= 1 face (seconds / image)")
    print(f"{'set':16s} {'n':>4s} " + " ".join(f"{n:>16s}" for n in configs))
    aligned_found: dict[str, list] = {n: [] for n in configs}
    for name in ALIGNED_SETS:
        paths = images_in(faces_dir / name)
        if not paths:
            continue
        cells = []
        for n, cfg in configs.items():
            found, sec = run(paths, cfg)
            aligned_found[n] += found
            cells.append(f"{np.mean([len(f) > 0 for f in found]):>8.2f} ({sec:5.3f})")
        print(f"{name:16s} {len(paths):>4d} " + " ".join(f"{c:>16s}" for c in cells))

    if "retinaface" in configs:
        print("\nLandmark error vs RetinaFace / inter-ocular distance (whole + aligned sets)")
        print(f"{'backend':10s} {'faces':>5s} {'mean':>6s}  eyes_l  eye_r   nose  mouth_l mouth_r")
        for n in configs:
            if n == "retinaface":
                continue
            ref = results["retinaface"][0] + aligned_found["retinaface"]
            err = landmark_errors(ref, results[n][0] + aligned_found[n])
            if err:
                e = np.mean(err, axis=0)
                print(f"{n:10s} {len(err):>5d} {e.mean():6.3f}  " + "  ".join(f"{x:6.3f}" for x in e))


if __name__ == "__main__":
    main()
