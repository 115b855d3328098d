"""Side-by-side comparison grids: rows of images, each row under a text label (PIL default font).

Every cell has the size of the largest image (after optional shrinking to ``max_cell``); smaller
images sit at the cell's top-left corner so pixels are never resampled unless asked. Layout, from
the top: ``gap``, then per row a label band (when labels are given), the cells and ``gap``; from
the left: ``gap`` then each cell followed by ``gap``. A label longer than the row widens the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GridCell = Image.Image | torch.Tensor | np.ndarray


def to_pil(image: GridCell) -> Image.Image:
    """PIL image, CHW/1CHW float tensor in [0, 1], or HWC uint8 array -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"grid cells must be [3,H,W] or [1,3,H,W] tensors, got {tuple(image.shape)}")
        t = t.expand(3, -1, -1)
        image = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"grid cells must be HxWx3 uint8 arrays, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")


def fit_within(img: Image.Image, max_cell: int | None) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most ``max_cell``; None keeps the size."""
    if max_cell is None or max(img.size) <= max_cell:
        return img
    scale = max_cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def label_band_height(labels: Sequence[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Height in pixels of the text band above each row: the most lines of any label, plus padding."""
    if not labels:
        return 0
    line = font.getbbox("Ag")[3] + 3  # descender room plus spacing between lines
    lines = max(len(str(label).splitlines()) or 1 for label in labels)
    return lines * line + 4


def draw_width(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Width in pixels of the longest line of ``text`` in ``font``."""
    return max((int(font.getlength(line)) + 1 for line in text.splitlines()), default=0)


def make_grid(
    rows: Sequence[Sequence[GridCell]],
    labels: Sequence[str] | None = None,
    max_cell: int | None = None,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Draw ``rows`` of images as a grid, each row preceded by its label (one label per row)."""
    if not rows or not all(rows):
        raise ValueError("make_grid needs at least one row, and every row needs at least one image")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows (expected one label per row)")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    cells = [[fit_within(to_pil(c), max_cell) for c in row] for row in rows]
    cell_w = max(im.width for row in cells for im in row)
    cell_h = max(im.height for row in cells for im in row)
    cols = max(len(row) for row in cells)
    font = ImageFont.load_default()
    band = label_band_height(labels or [], font)
    # Wide enough for the images and for the longest label line (labels are never clipped).
    text_w = max((draw_width(str(label), font) for label in labels or []), default=0)
    width = max(cols * cell_w + (cols + 1) * gap, text_w + 2 * gap)
    height = len(cells) * (band + cell_h + gap) + gap
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    y = gap
    for r, row in enumerate(cells):
        if labels is not None:
            draw.multiline_text((gap, y + 2), str(labels[r]), fill=text_color, font=font, spacing=3)
        y += band
        for c, im in enumerate(row):
            canvas.paste(im, (gap + c * (cell_w + gap), y))
        y += cell_h + gap
    return canvas
