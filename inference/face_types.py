"""Data passed between face detection, alignment, restoration and paste-back.

Coordinates are pixels of the source image, x to the right, y down, origin at the top-left
corner of the top-left pixel's centre (OpenCV's convention). The five landmarks follow the
RetinaFace/InsightFace order, as seen in the image: image-left eye, image-right eye, nose tip,
image-left mouth corner, image-right mouth corner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class DetectedFace:
    """One face found in one image of a batch."""

    image_index: int  # which image of the input batch
    box: np.ndarray  # float32 [4]: x1, y1, x2, y2
    landmarks: np.ndarray  # float32 [5, 2] in LANDMARK_NAMES order
    score: float  # detector confidence (backend-specific scale, higher is better)
    backend: str  # which detector produced it

    @property
    def size(self) -> float:
        """Inter-ocular distance in pixels (how large the face is)."""
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))


@dataclass
class AlignedFace:
    """An aligned crop's geometry: the affine that maps source pixels into the crop."""

    face: DetectedFace
    affine: np.ndarray  # float64 [2, 3]: source (x, y, 1) -> crop (x, y)
    crop_size: int  # side of the square crop in pixels
    template: str  # name of the landmark template used


@dataclass
class FaceData:
    """PRIORFACE_FACES: the aligned faces of a batch of photos, enough to paste results back."""

    image_sizes: list[tuple[int, int]]  # (height, width) of each source image
    faces: list[AlignedFace] = field(default_factory=list)

    def faces_of(self, image_index: int) -> list[int]:
        """Indices into ``faces`` that belong to one source image."""
        return [i for i, f in enumerate(self.faces) if f.face.image_index == image_index]
