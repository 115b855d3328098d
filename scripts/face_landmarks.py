"""Detect 5 landmarks once for every image of a folder of aligned faces and store them as JSON.

    python scripts/face_landmarks.py ../shared/data/faces/train/utkface runs/utkface_landmarks.json

The training recipe of the embedded LLV-FSR weights draws the facial-region mask prior from these
landmarks (detected on the HQ face, in its own pixel coordinates). Resumable: an existing output
file is read and only the missing images are processed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    """Detect landmarks for every image below a folder; write {relative name: [[x, y] x5] | null}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("output")
    parser.add_argument("--detector", default="dlib")
    parser.add_argument(
        "--upsample", type=int, default=1, help="dlib HOG upsampling (1 finds faces from ~40 px)"
    )
    args = parser.parse_args(argv)

    from priorface.inference.face_detection import detect_faces
    from priorface.inference.images import list_images, load_image_file
    from priorface.inference.progress import progress_bar
    from priorface.models.checkpoint import write_atomically

    out = Path(args.output)
    done = json.loads(out.read_text()) if out.is_file() else {}
    files = [(p, rel) for p, rel in list_images([args.folder]) if rel not in done]
    with progress_bar(len(files), "Landmarks") as bar:
        for n, (path, rel) in enumerate(files):
            faces = detect_faces(
                load_image_file(path).unsqueeze(0), args.detector, max_faces=1, upsample=args.upsample
            )
            done[rel] = faces[0].landmarks.round(2).tolist() if faces else None
            if n % 500 == 499:
                write_atomically(out, lambda tmp: tmp.write_text(json.dumps(done)))
            bar.update(1)
    write_atomically(out, lambda tmp: tmp.write_text(json.dumps(done)))
    found = sum(v is not None for v in done.values())
    print(f"{found} of {len(done)} images have landmarks -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
