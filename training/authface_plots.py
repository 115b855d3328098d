"""Plot of AuthFace's logit-normal time weight, written by the trainer next to its logs.

Drawn with matplotlib when it is installed (imported lazily: it is a training-only extra) and
with PIL otherwise, so a run never fails for lack of a plotting library.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..models.authface_facial import logit_normal_median, logit_normal_mode, logit_normal_weight

log = logging.getLogger(__name__)

PAPER_PEAK = 0.37  # where AuthFace says the weight peaks (it is the median, sigmoid(-0.5) = 0.377)
_W, _H, _PAD = 640, 400, 50


def weight_curve(m: float, s: float, points: int = 999) -> tuple[list[float], list[float]]:
    """t on an open grid of (0, 1) and the logit-normal weight there."""
    t = torch.linspace(0.0, 1.0, points + 2, dtype=torch.float64)[1:-1]
    return t.tolist(), logit_normal_weight(t, m, s).tolist()


def _markers(m: float, s: float) -> list[tuple[str, float, str]]:
    mode, median = logit_normal_mode(m, s), logit_normal_median(m)
    return [
        (f"mode t={mode:.3f}", mode, "#d62728"),
        (f"median t={median:.3f}", median, "#2ca02c"),
        (f"paper 'peak' t={PAPER_PEAK}", PAPER_PEAK, "#7f7f7f"),
    ]


def _plot_matplotlib(path: Path, m: float, s: float) -> None:
    # A bare Figure (no pyplot): no global backend state, works headless.
    from matplotlib.figure import Figure

    t, w = weight_curve(m, s)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    ax.plot(t, w, color="#1f77b4", label=f"logit-normal m={m}, s={s}")
    for label, x, colour in _markers(m, s):
        ax.axvline(x, color=colour, linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("t = timestep / num_train_timesteps")
    ax.set_ylabel("facial loss weight w(t)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_pil(path: Path, m: float, s: float) -> None:
    t, w = weight_curve(m, s)
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, right, bottom = _PAD, 20, _W - 20, _H - _PAD
    top_w = max(w) * 1.05 or 1.0
    draw.rectangle([left, top, right, bottom], outline="#999999")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - y / top_w * (bottom - top)

    draw.line([to_px(x, y) for x, y in zip(t, w, strict=True)], fill="#1f77b4", width=2)
    for k, (label, x, colour) in enumerate(_markers(m, s)):
        px = to_px(x, 0)[0]
        draw.line([(px, top), (px, bottom)], fill=colour, width=1)
        draw.text((right - 200, top + 8 + 14 * k), label, fill=colour, font=font)
    draw.text((left, 4), f"logit-normal weight, m={m}, s={s}  (max {max(w):.3f})", fill="black", font=font)
    draw.text((left, bottom + 6), "t = 0", fill="#555555", font=font)
    draw.text((right - 30, bottom + 6), "t = 1", fill="#555555", font=font)
    img.save(path)


def plot_time_weight(path: str | Path, m: float = -0.5, s: float = 1.0) -> Path:
    """Write a PNG of w(t) over t in (0, 1) with the mode, the median and the paper's 0.37 marked."""
    if s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    path = Path(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("matplotlib not installed; drawing the time-weight plot with PIL")
        _plot_pil(path, m, s)
    else:
        _plot_matplotlib(path, m, s)
    return path
