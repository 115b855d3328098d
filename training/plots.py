"""Training curves drawn with PIL (no plotting library needed): one panel per logged column."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_PANEL_W, _PANEL_H, _PAD = 420, 220, 36
_SKIP = {"step", "seconds", "lr"}


def _series(csv_path: Path) -> dict[str, list[tuple[float, float]]]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key in _SKIP or value in ("", None):
                continue
            try:
                series.setdefault(key, []).append((float(r["step"]), float(value)))
            except ValueError:
                continue
    return series


def _panel(name: str, points: list[tuple[float, float]], font) -> Image.Image:
    img = Image.new("RGB", (_PANEL_W, _PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    left, top, right, bottom = _PAD + 20, 22, _PANEL_W - 10, _PANEL_H - _PAD + 8
    draw.rectangle([left, top, right, bottom], outline="#999999")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    if len(points) > 1:
        draw.line([to_px(x, y) for x, y in points], fill="#1f77b4", width=2)
    else:
        px, py = to_px(*points[0])
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill="#1f77b4")
    draw.text((left, 4), f"{name}  (last {ys[-1]:.4g})", fill="black", font=font)
    draw.text((2, top), f"{y1:.4g}", fill="#555555", font=font)
    draw.text((2, bottom - 10), f"{y0:.4g}", fill="#555555", font=font)
    draw.text((left, bottom + 4), f"step {x0:.0f}", fill="#555555", font=font)
    draw.text((right - 70, bottom + 4), f"step {x1:.0f}", fill="#555555", font=font)
    return img


def plot_log(csv_path: Path, png_path: Path, columns: int = 2) -> Path | None:
    """Draw every numeric column of a training log against the step; None when nothing is logged."""
    if not Path(csv_path).is_file():
        return None
    series = _series(Path(csv_path))
    if not series:
        return None
    font = ImageFont.load_default()
    panels = [_panel(name, pts, font) for name, pts in sorted(series.items())]
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * _PANEL_W, rows * _PANEL_H), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * _PANEL_W, (i // columns) * _PANEL_H))
    sheet.save(png_path)
    return Path(png_path)
