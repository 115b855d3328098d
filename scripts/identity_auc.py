"""Check the identity metric on labelled face pairs: ROC AUC of same vs different person distances.

Usage: python scripts/identity_auc.py [--pairs ../shared/data/faces/lfw-identity/pairs.csv]
The CSV has columns image_a, image_b, same_person (1/0); image paths are relative to its folder.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from priorface.inference.metrics.identity import (
    SAME_PERSON_THRESHOLD,
    FaceEmbedding,
    descriptor_distance,
    embed_face,
    roc_auc,
)

DEFAULT_PAIRS = Path(__file__).resolve().parents[1].parent / "shared/data/faces/lfw-identity/pairs.csv"


def read_pairs(path: Path) -> list[tuple[str, str, int]]:
    """Rows of (image_a, image_b, same_person) from a pairs CSV with that header."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        expected = {"image_a", "image_b", "same_person"}
        if not expected <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns {sorted(expected)}, got {reader.fieldnames}")
        return [(r["image_a"], r["image_b"], int(r["same_person"])) for r in reader]


def pair_distances(
    pairs: list[tuple[str, str, int]], folder: Path, num_jitters: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Distances and labels of every pair (each image embedded once) and how many had no detection."""
    cache: dict[str, FaceEmbedding] = {}

    def embed(name: str) -> FaceEmbedding:
        if name not in cache:
            cache[name] = embed_face(np.asarray(Image.open(folder / name).convert("RGB")), num_jitters)
        return cache[name]

    distances = np.array([descriptor_distance(embed(a), embed(b)) for a, b, _ in pairs])
    labels = np.array([same for _, _, same in pairs])
    return distances, labels, sum(not e.detected for e in cache.values())


def main(argv: list[str] | None = None) -> int:
    """Print AUC, mean distances and accuracy at dlib's 0.6 threshold."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pairs", type=Path, default=DEFAULT_PAIRS, help="pairs CSV (image_a,image_b,same_person)"
    )
    ap.add_argument("--limit", type=int, default=0, help="use only the first N same and N different pairs")
    ap.add_argument("--num-jitters", type=int, default=0)
    args = ap.parse_args(argv)
    pairs = read_pairs(args.pairs)
    if args.limit:
        pairs = [p for p in pairs if p[2]][: args.limit] + [p for p in pairs if not p[2]][: args.limit]
    start = time.perf_counter()
    d, y, undetected = pair_distances(pairs, args.pairs.parent, args.num_jitters)
    auc = roc_auc(y, -d)  # a smaller distance should mean "same person"
    accuracy = float(((d < SAME_PERSON_THRESHOLD) == y.astype(bool)).mean())
    print(f"pairs: {int(y.sum())} same, {int((1 - y).sum())} different ({args.pairs})")
    print(f"mean distance: same {d[y == 1].mean():.4f}, different {d[y == 0].mean():.4f}")
    print(
        f"accuracy at {SAME_PERSON_THRESHOLD}: {accuracy:.4f}; images without a detected face: {undetected}"
    )
    print(f"ROC AUC: {auc:.4f}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
