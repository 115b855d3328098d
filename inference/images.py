"""Conversions between ComfyUI's IMAGE/MASK conventions and BCHW tensors, with input checks.

ComfyUI IMAGE: float32 ``[B, H, W, C]`` RGB in 0..1 on CPU. MASK: float32 ``[B, H, W]`` in 0..1.
Library code works on float ``[B, C, H, W]`` in 0..1. Other nodes sometimes hand over grayscale
(C=1), gray+alpha (C=2) or RGBA (C=4) images, unbatched ``[H, W, C]`` tensors, or LoadImage's
64x64 all-zero placeholder mask for pictures without alpha; all are handled here, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# LoadImage returns this many pixels per side as an all-zero mask when the file has no alpha.
_PLACEHOLDER_MASK_SIDE = 64


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` (or ``[H,W,C]``) with 1-4 channels -> RGB float ``[B,3,H,W]`` in 0..1.

    Grayscale is replicated to RGB; an alpha channel is dropped (use :func:`alpha_of` to keep it).
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor (ComfyUI IMAGE), got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"{name} must have shape [B,H,W,C] (ComfyUI IMAGE), got {tuple(image.shape)}")
    b, h, w, c = image.shape
    if c not in (1, 2, 3, 4):
        raise ValueError(
            f"{name} must have 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels in the last axis, "
            f"got shape {tuple(image.shape)}; is it a MASK or a BCHW tensor?"
        )
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    image = image.float()
    _check_finite(image, name)
    rgb = image[..., :3] if c >= 3 else image[..., :1].expand(b, h, w, 3)
    return rgb.clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def alpha_of(image: torch.Tensor) -> torch.Tensor | None:
    """Alpha channel of a 2- or 4-channel IMAGE as ``[B,H,W]``, or None when there is none."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.shape[-1] in (2, 4):
        return image[..., -1].float().clamp(0.0, 1.0)
    return None


def bchw_to_image(t: torch.Tensor) -> torch.Tensor:
    """BCHW float (1 or 3 channels) -> ComfyUI IMAGE ``[B,H,W,3]`` float32 on CPU, clamped to 0..1."""
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected a [B,1|3,H,W] tensor, got {tuple(t.shape)}")
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.detach().float().clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu()


def mask_to_bhw(mask: torch.Tensor | None, batch: int, height: int, width: int) -> torch.Tensor | None:
    """Normalise a MASK to ``[batch,H,W]`` for an image of that size; None when no mask is given.

    LoadImage's 64x64 all-zero placeholder (picture without alpha) counts as "no mask". A mask of
    another size is resized (bilinear), a batch of one is repeated; other batch sizes are an error.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    elif mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"mask must have shape [B,H,W] (ComfyUI MASK), got {tuple(mask.shape)}")
    mask = mask.float()
    _check_finite(mask, "mask")
    side = _PLACEHOLDER_MASK_SIDE
    if mask.shape[-2:] == (side, side) and (height, width) != (side, side) and not mask.any():
        return None
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[
            :, 0
        ]
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1, -1)
    elif mask.shape[0] != batch:
        raise ValueError(
            f"mask batch {mask.shape[0]} does not match image batch {batch} (expected 1 or {batch})"
        )
    return mask.clamp(0.0, 1.0).contiguous()


def stack_same_size(images: Sequence[torch.Tensor], name: str = "images") -> torch.Tensor:
    """Concatenate BCHW tensors into one batch; mixed sizes are an error naming each size."""
    if not images:
        raise ValueError(f"{name}: nothing to stack")
    sizes = sorted({tuple(t.shape[-2:]) for t in images})
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise ValueError(
            f"{name} have different sizes ({listed}); a ComfyUI batch needs one size. "
            "Resize them first or process them one at a time."
        )
    return torch.cat(list(images), dim=0)


def resize_bchw(t: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize BCHW in 0..1 with antialiasing when shrinking; result clamped to 0..1."""
    if (t.shape[-2], t.shape[-1]) == (height, width):
        return t
    shrinking = height < t.shape[-2] or width < t.shape[-1]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["antialias"] = shrinking
    return F.interpolate(t, size=(height, width), mode=mode, **kwargs).clamp(0.0, 1.0)


def load_image_file(path) -> torch.Tensor:
    """Read an image file as RGB CHW float32 in [0, 1] (grayscale and alpha are converted)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def save_image_file(chw: torch.Tensor, path) -> None:
    """Write an RGB CHW float tensor in [0, 1] as an 8-bit image (format from the suffix), atomically."""
    import os
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    path = Path(path)
    arr = (chw.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_images(folders) -> list:
    """(path, relative name) of every image below the folders, sorted by relative name."""
    from pathlib import Path

    found = []
    for folder in [folders] if isinstance(folders, (str, Path)) else folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        for p in root.rglob("*"):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                found.append((p, p.relative_to(root).as_posix()))
    return sorted(found, key=lambda pr: pr[1])
