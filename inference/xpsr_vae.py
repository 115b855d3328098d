"""VAE encode/decode for XPSR with optional tiling (images in [0, 1], latents scaled like SD).

Tiles are blended with :func:`latent_tiling.tiled_map`. The encoder's tiles are blended as latent
*moments* (mean and log-variance), and the latent is then sampled once over the whole image with
one draw of the seeded generator, so the random numbers do not depend on the tiling. XPSR's own
tiled VAE (the multidiffusion-upscaler hook) also synchronises GroupNorm statistics across tiles;
plain blending is simpler and shows faint seams only with small tiles on strongly varying images.
"""

from __future__ import annotations

import torch

from .latent_tiling import tiled_map

VAE_FACTOR = 8  # SD VAEs downsample 8x
DEFAULT_SCALING = 0.18215  # SD1.5 latent scaling when the VAE config has none


def scaling_factor(vae) -> float:
    """The VAE's latent scaling factor (0.18215 for SD1.5)."""
    return float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALING)


def _round_tile(tile: int, align: int) -> int:
    return 0 if tile <= 0 else max(align, tile // align * align)


def encode_moments(vae, images: torch.Tensor, tile: int = 0, overlap: int = 0) -> torch.Tensor:
    """Latent (mean, logvar) of BCHW images in [0, 1] (H, W multiples of 8), tiled when larger than ``tile`` px."""
    dtype = next(vae.parameters()).dtype

    def run(x, _box):
        return vae.encode((x * 2.0 - 1.0).to(dtype)).latent_dist.parameters

    tile = _round_tile(tile, VAE_FACTOR)
    return tiled_map(
        run, images, tile, overlap // VAE_FACTOR * VAE_FACTOR, 1 / VAE_FACTOR, "linear", VAE_FACTOR
    )


def encode_latents(
    vae,
    images: torch.Tensor,
    generator: torch.Generator | None,
    tile: int = 0,
    overlap: int = 0,
    sample: bool = True,
) -> torch.Tensor:
    """Scaled SD latents of images in [0, 1]: a sample of the posterior (``sample``) or its mean."""
    moments = encode_moments(vae, images, tile, overlap).float()
    mean, logvar = moments.chunk(2, dim=1)
    latents = mean
    if sample:
        # Drawn on the generator's device (CPU) so a seed gives the same latent on every device.
        noise = torch.randn(
            mean.shape, generator=generator, device=_gen_device(generator), dtype=torch.float32
        )
        latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
    return latents * scaling_factor(vae)


def decode_latents(vae, latents: torch.Tensor, tile: int = 0, overlap: int = 0) -> torch.Tensor:
    """Images in [0, 1] from scaled SD latents, tiled when the latent is larger than ``tile``."""
    dtype = next(vae.parameters()).dtype
    scale = scaling_factor(vae)

    def run(z, _box):
        return vae.decode((z / scale).to(dtype)).sample.float()

    out = tiled_map(run, latents, tile, overlap, VAE_FACTOR, "linear")
    return ((out + 1.0) / 2.0).clamp(0.0, 1.0)


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
