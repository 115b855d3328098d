"""Pictures of priors: a colour per mask class over the face, and a colour map for depth (BCHW)."""

from __future__ import annotations

import torch

from ..images import resize_bchw

# RGB 0..1 per class name; unknown class names get a colour from _FALLBACK by index.
CLASS_COLOURS = {
    "background": (0.0, 0.0, 0.0),
    "skin": (1.0, 0.75, 0.55),
    "eyes": (0.2, 0.5, 1.0),
    "brows": (0.55, 0.3, 0.1),
    "nose": (1.0, 0.9, 0.1),
    "mouth": (1.0, 0.15, 0.2),
    "hair": (0.6, 0.2, 0.8),
    "face": (1.0, 0.75, 0.55),
}
_FALLBACK = ((0.1, 0.8, 0.3), (0.9, 0.4, 0.0), (0.0, 0.8, 0.8), (0.8, 0.0, 0.8), (0.5, 0.5, 0.5))

# Depth colour map: dark violet (far) -> blue -> teal -> green -> yellow (near). Anchors chosen
# for increasing lightness, so the map also reads in grey.
_DEPTH_ANCHORS = torch.tensor(
    [
        [0.20, 0.02, 0.30],
        [0.23, 0.25, 0.60],
        [0.13, 0.50, 0.56],
        [0.25, 0.72, 0.40],
        [0.98, 0.92, 0.15],
    ]
)


def class_colours(labels: tuple[str, ...] | list[str] | None, k: int) -> torch.Tensor:
    """Colours ``[K,3]`` for K mask classes, by class name when known."""
    names = list(labels) if labels is not None else [f"class{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"mask has {k} classes but {len(names)} label names were given: {names}")
    return torch.tensor([CLASS_COLOURS.get(n, _FALLBACK[i % len(_FALLBACK)]) for i, n in enumerate(names)])


def mask_to_colour(mask: torch.Tensor, labels=None) -> torch.Tensor:
    """One-hot (or soft) mask ``[B,K,H,W]`` -> colour image ``[B,3,H,W]``."""
    if mask.dim() != 4:
        raise ValueError(f"mask must be [B,K,H,W], got {tuple(mask.shape)}")
    colours = class_colours(labels, mask.shape[1])
    return torch.einsum("bkhw,kc->bchw", mask.float(), colours).clamp(0.0, 1.0)


def mask_overlay(
    images: torch.Tensor | None, mask: torch.Tensor, labels=None, alpha: float = 0.5
) -> torch.Tensor:
    """Class colours blended over the faces (``alpha`` opacity; background left as is) -> BCHW."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = mask_to_colour(mask, labels)
    if images is None:
        return colour
    if images.shape[0] != mask.shape[0]:
        raise ValueError(f"{images.shape[0]} image(s) for a mask of {mask.shape[0]} face(s)")
    h, w = images.shape[-2:]
    colour = resize_bchw(colour, h, w, "nearest")
    weight = mask.float()
    if labels is not None and "background" in labels:
        weight = torch.cat(
            [weight[:, : labels.index("background")], weight[:, labels.index("background") + 1 :]], 1
        )
    covered = resize_bchw(weight.sum(1, keepdim=True).clamp(0.0, 1.0), h, w, "nearest") * alpha
    return (images.float() * (1.0 - covered) + colour * covered).clamp(0.0, 1.0)


def depth_colormap(depth: torch.Tensor) -> torch.Tensor:
    """Depth ``[B,1,H,W]`` in [0,1] (1 = near) -> colour image ``[B,3,H,W]`` (linear between anchors)."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be [B,1,H,W], got {tuple(depth.shape)}")
    x = depth.float().clamp(0.0, 1.0)[:, 0] * (len(_DEPTH_ANCHORS) - 1)
    lo = x.floor().long().clamp(max=len(_DEPTH_ANCHORS) - 2)
    t = (x - lo).unsqueeze(-1)
    rgb = _DEPTH_ANCHORS[lo] * (1.0 - t) + _DEPTH_ANCHORS[lo + 1] * t  # [B,H,W,3]
    return rgb.permute(0, 3, 1, 2).contiguous()


def grey_placeholder(batch: int, height: int, width: int) -> torch.Tensor:
    """Mid-grey ``[B,3,H,W]`` image standing in for a prior that is absent."""
    return torch.full((batch, 3, height, width), 0.5)


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape)


def describe_bundle(bundle, max_text: int = 120) -> str:
    """Readable summary: which priors are present, their shapes, first texts, and their sources."""
    from .bundle import TextEmbedding

    lines = [f"{bundle.batch_size} face(s); priors: {', '.join(bundle.present()) or 'none'}"]
    for name in bundle.present():
        value = getattr(bundle, name)
        source = bundle.sources.get(name, {})
        where = f"from {source.get('extractor', 'unknown')}"
        if isinstance(value, list):
            first = value[0] if len(value[0]) <= max_text else value[0][: max_text - 3] + "..."
            lines.append(
                f"- {name} {where}: {first!r}" + (f" (+{len(value) - 1} more)" if len(value) > 1 else "")
            )
        elif isinstance(value, TextEmbedding):
            lines.append(f"- {name} {where}: tokens {_shape(value.tokens)}, pooled {_shape(value.pooled)}")
        elif name == "mask":
            lines.append(f"- mask {where}: {_shape(value)}, classes {list(bundle.mask_labels or [])}")
        else:
            lines.append(f"- {name} {where}: {_shape(value)}")
        settings = {k: v for k, v in source.items() if k != "extractor"}
        if settings:
            lines.append(f"    settings: {settings}")
    return "\n".join(lines)
