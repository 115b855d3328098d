"""Side-by-side comparison of restoration methods on the same faces, scored against a reference.

Every method's output is brought to one display size (the reference's, else the largest output)
with antialiased bicubic resizing, so methods with different output sizes can be compared; the
caption says when an output was resized. Metrics (PSNR/SSIM on RGB, dlib identity distance) are
computed at that size, which is the only size where a pixel comparison is defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from ..images import resize_bchw
from .grid import make_grid, to_pil


@dataclass
class MethodScore:
    """One method's scores on one face (None where not computed)."""

    method: str
    face: int
    psnr: float | None = None
    ssim: float | None = None
    identity_distance: float | None = None
    resized_from: tuple[int, int] | None = None

    def caption(self) -> str:
        """Short text for under the picture."""
        parts = []
        if self.psnr is not None:
            parts.append(f"{self.psnr:.2f} dB  SSIM {self.ssim:.3f}")
        if self.identity_distance is not None:
            parts.append(f"ID dist {self.identity_distance:.3f}")
        if self.resized_from is not None:
            parts.append(f"(from {self.resized_from[1]}x{self.resized_from[0]})")
        return "\n".join(parts)


def _captioned(image: torch.Tensor, title: str, caption: str) -> Image.Image:
    """The picture with a white band below holding its title and caption lines."""
    pil = to_pil(image)
    font = ImageFont.load_default()
    lines = [title, *[line for line in caption.split("\n") if line]]
    band = 4 + 12 * len(lines)
    # Small faces must not clip their caption: the cell widens to the longest line.
    width = max(pil.width, *(int(font.getlength(line)) + 4 for line in lines))
    out = Image.new("RGB", (width, pil.height + band), (255, 255, 255))
    out.paste(pil, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, pil.height + 2 + 12 * i), line, fill=(0, 0, 0), font=font)
    return out


def _per_face(batch: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if batch.shape[0] not in (1, n):
        raise ValueError(f"{name} has {batch.shape[0]} images; expected 1 or {n} (one per degraded face)")
    return batch.expand(n, -1, -1, -1) if batch.shape[0] == 1 else batch


def compare_methods(
    degraded: torch.Tensor,
    outputs: Sequence[tuple[str, torch.Tensor]],
    reference: torch.Tensor | None = None,
    identity: bool = True,
) -> tuple[Image.Image, list[MethodScore]]:
    """Grid (rows = faces; columns = degraded, each method, reference) and the scores, BCHW in [0, 1]."""
    if not outputs:
        raise ValueError("connect at least one method output to compare")
    n = degraded.shape[0]
    outs = [(name, _per_face(o, n, name)) for name, o in outputs]
    if reference is not None:
        reference = _per_face(reference, n, "reference")
        size = tuple(reference.shape[-2:])
    else:
        size = max((tuple(o.shape[-2:]) for _, o in outs), key=lambda s: s[0] * s[1])
    scores: list[MethodScore] = []
    rows = []
    for face in range(n):
        shown = resize_bchw(degraded[face : face + 1], *size, mode="nearest")
        row = [_captioned(shown, "degraded input", f"(from {degraded.shape[-1]}x{degraded.shape[-2]})")]
        for name, o in outs:
            img = o[face : face + 1]
            score = MethodScore(name, face)
            if tuple(img.shape[-2:]) != size:
                score.resized_from = tuple(img.shape[-2:])
                img = resize_bchw(img, *size)
            if reference is not None:
                _score_against(score, img, reference[face : face + 1], identity)
            scores.append(score)
            row.append(_captioned(img, name, score.caption()))
        if reference is not None:
            row.append(_captioned(reference[face : face + 1], "reference", ""))
        rows.append(row)
    labels = [f"face {i}" for i in range(n)] if n > 1 else None
    return make_grid(rows, labels), scores


def _score_against(score: MethodScore, image: torch.Tensor, reference: torch.Tensor, identity: bool) -> None:
    from .psnr_ssim import psnr, ssim

    score.psnr = float(psnr(image, reference)[0])
    score.ssim = float(ssim(image, reference)[0])
    if identity:
        from .identity import identity_distance

        score.identity_distance, _ = identity_distance(image[0], reference[0])


def scores_table(scores: Sequence[MethodScore]) -> str:
    """One line per (face, method) with every score, for a text display."""
    lines = []
    for s in scores:
        values = s.caption().replace("\n", ", ") or "no reference: not scored"
        lines.append(f"face {s.face} | {s.method}: {values}")
    return "\n".join(lines)
