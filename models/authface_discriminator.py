"""AuthFace facial-component discriminators on 4-channel SDXL latent patches.

AuthFace (arXiv 2410.09864) publishes no code; the architecture follows GFPGAN's
``FacialComponentDiscriminator`` (the public analogue, see shared/reference/papers.md section 2.2a)
in plain torch: a VGG-like stack of 3x3 convolutions with two stride-2 steps, returning a patch
logit map and the features after the third and fifth convolutions (used by the Gram style loss).
Differences from GFPGAN, on purpose: the first convolution reads ``in_channels`` latent channels
(4 for SD/SDXL) instead of RGB, and plain ``nn.Conv2d`` + LeakyReLU(0.2) replace StyleGAN2's
equalised convolutions with blur-pool downsampling (latent patches are only 16-48 px wide).

Regions. The five landmarks give three boxes (image-left eye, image-right eye, mouth; see
``inference/priors/landmark_mask.eye_mouth_boxes``). Two region sets are supported:

* ``"paired"`` (the default): ``("eyes", "mouth")``, two discriminators as the AuthFace paper
  describes its eye and mouth regions; ``eyes`` is the union box of both eyes (about 3:1 wide).
* ``"separate"``: ``("left_eye", "right_eye", "mouth")``, three discriminators as in GFPGAN.

The paper is the method being reproduced, hence the default; GFPGAN's split is one flag away.
On a horizontal flip the caller must swap the left/right eye boxes (GFPGAN does the same).
"""

from __future__ import annotations

from torch import nn

REGION_SETS = {
    "paired": ("eyes", "mouth"),
    "separate": ("left_eye", "right_eye", "mouth"),
}
REGION_NAMES = ("left_eye", "right_eye", "eyes", "mouth")
# Patch sides (h, w) in latent pixels for a 128x128 latent (SDXL at 1024 px). Chosen to match the
# natural size of eye_mouth_boxes on FFHQ-aligned faces (eye box about 15.7 latent px, mouth box
# about 34.7; measured on the ffhq template at 1024 px) so crops are resampled close to 1:1.
# GFPGAN's proportions (80 and 120 px at 512) would give 20 and 30; ours keep each side a multiple of 4
# so the two stride-2 steps divide evenly. Scaled linearly for other latent sizes.
_BASE_LATENT = 128
_BASE_PATCH = {"left_eye": (16, 16), "right_eye": (16, 16), "eyes": (16, 48), "mouth": (32, 32)}
_MIN_PATCH = 4


def resolve_regions(regions: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A region set name ("paired", "separate") or an explicit tuple of region names -> tuple of names."""
    if isinstance(regions, str):
        if regions not in REGION_SETS:
            raise ValueError(f"unknown region set {regions!r}; expected one of {', '.join(REGION_SETS)}")
        return REGION_SETS[regions]
    names = tuple(regions)
    bad = [r for r in names if r not in REGION_NAMES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"regions must be distinct names from {REGION_NAMES}, got {names}")
    return names


def default_patch_sizes(latent_size: int | tuple[int, int], regions="paired") -> dict[str, tuple[int, int]]:
    """Patch (h, w) per region for a latent of this size, scaled from the 128-px SDXL defaults."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be positive, got {h}x{w}")
    scale = min(h, w) / _BASE_LATENT
    return {
        r: tuple(max(_MIN_PATCH, int(round(side * scale))) for side in _BASE_PATCH[r])
        for r in resolve_regions(regions)
    }


def _conv(in_ch: int, out_ch: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)]
    if act:
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class FacialDiscriminator(nn.Module):
    """Patch discriminator for one facial region: latent patch -> (logit map, [feat1, feat2])."""

    def __init__(self, in_channels: int = 4, channels: int = 64):
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be positive, got {in_channels}, {channels}")
        self.config = {"in_channels": in_channels, "channels": channels}
        c = channels
        self.conv1 = _conv(in_channels, c)
        self.conv2 = _conv(c, 2 * c, stride=2)
        self.conv3 = _conv(2 * c, 2 * c)  # first style feature (GFPGAN: 128 ch, half resolution)
        self.conv4 = _conv(2 * c, 4 * c, stride=2)
        self.conv5 = _conv(4 * c, 4 * c)  # second style feature (GFPGAN: 256 ch, quarter resolution)
        self.final = _conv(4 * c, 1, act=False)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected patches [B,{self.config['in_channels']},H,W], got {tuple(x.shape)}")
        h = self.conv2(self.conv1(x))
        feat1 = self.conv3(h)
        feat2 = self.conv5(self.conv4(feat1))
        return self.final(feat2), [feat1, feat2]


class FacialDiscriminators(nn.Module):
    """One :class:`FacialDiscriminator` per region, with the patch size each one is fed."""

    def __init__(
        self,
        regions: str | tuple[str, ...] = "paired",  # "paired", "separate" or explicit region names
        in_channels: int = 4,  # latent channels (4 for SD1.5/SDXL)
        channels: int = 64,  # base width (GFPGAN: 64)
        patch_sizes: dict[str, tuple[int, int]] | None = None,  # default: default_patch_sizes(128)
    ):
        super().__init__()
        names = resolve_regions(regions)
        sizes = default_patch_sizes(_BASE_LATENT, names) if patch_sizes is None else patch_sizes
        missing = [r for r in names if r not in sizes]
        if missing:
            raise ValueError(f"patch_sizes lacks regions {missing}; got keys {sorted(sizes)}")
        self.patch_sizes = {r: _as_hw(sizes[r], r) for r in names}
        self.regions = names
        self.config = {
            "regions": list(names),
            "in_channels": in_channels,
            "channels": channels,
            "patch_sizes": {r: list(hw) for r, hw in self.patch_sizes.items()},
        }
        self.discs = nn.ModuleDict({r: FacialDiscriminator(in_channels, channels) for r in names})

    def forward(self, region: str, patches):
        """Run the discriminator of ``region`` on patches ``[B,C,h,w]``."""
        if region not in self.discs:
            raise ValueError(f"no discriminator for region {region!r}; have {self.regions}")
        return self.discs[region](patches)


def _as_hw(size, region: str) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"patch size of {region!r} must be a positive int or (h, w), got {size!r}")
    return int(hw[0]), int(hw[1])
