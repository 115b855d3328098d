"""VSPBFR inference on aligned faces and whole photos, in the order of the official test script.

Per face (official ``restoration_test.py``, papers.md section 4.1): the LQ face (512, [-1, 1]) ->
e4e style encoder (bilinear to 256 inside) -> W+ code of the LQ -> code diffuser from N(0, I),
posterior-mean steps -> visual style prompt w0 -> StyleGAN2 decoder on w0 with fresh noise ->
feature bank -> restoration network (LQ, feature bank, w0, random z with style mixing).

Every random draw comes from its own CPU ``torch.Generator``, seeded from (seed, face index): the
diffusion start, the StyleGAN noise maps, the z codes, the style-mixing decision and crossover
layer, and the restoration network's noise. The global RNG is never used, so one seed gives the
same faces on every run (and the same random numbers on every device; fp16 on CUDA still rounds
differently), and a face's result does not depend on the other faces of the batch. Faces run one
at a time (the restoration network draws its noise for a whole batch at once).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .face_types import FaceData
from .images import resize_bchw
from .progress import check_interrupted, progress_bar
from .vspbfr_loading import VSPBFRModels
from .vspbfr_sampler import sample_codes

log = logging.getLogger(__name__)

SOURCES = ("start", "stylegan_noise", "z", "mixing", "restoration_noise")
MIXING_PROB = 0.5  # official test: style mixing with probability 0.5


class VSPBFRResult(NamedTuple):
    """Restored faces (N,3,S,S) in [0,1], prompts w0 (N,L,D), optional trajectory (N,steps+1,3,S,S)."""

    faces: torch.Tensor
    prompts: torch.Tensor
    trajectory: torch.Tensor | None


def face_generators(seed: int, index: int) -> dict[str, torch.Generator]:
    """One independent CPU generator per random source for face ``index`` of a run with ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(len(SOURCES))
    return {
        name: torch.Generator().manual_seed(int(child.generate_state(1, np.uint64)[0]))
        for name, child in zip(SOURCES, children, strict=True)
    }


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn in fp32 on the CPU whatever the compute device/dtype: same numbers everywhere.
    return torch.randn(tuple(shape), generator=generator).to(like.device, like.dtype)


def stylegan_noise(
    models: VSPBFRModels, generator: torch.Generator, like: torch.Tensor
) -> list[torch.Tensor]:
    """Fresh per-layer noise maps (1,1,r,r) for the decoder (``randomize_noise=True`` made explicit)."""
    n = models.codec.decoder.config.num_layers
    return [_randn((1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)), generator, like) for i in range(n)]


def latent_inputs(models: VSPBFRModels, gens, like: torch.Tensor, mixing_prob: float = MIXING_PROB):
    """(z list, crossover index or None): two z with probability ``mixing_prob`` (style mixing)."""
    net = models.restoration
    z = [_randn((1, net.config.style_dim), gens["z"], like) for _ in range(2)]
    # Both draws happen whatever the outcome, so the z stream never depends on the decision.
    mix = float(torch.rand((), generator=gens["mixing"])) < mixing_prob
    index = int(torch.randint(1, net.n_latent, (), generator=gens["mixing"]))
    return (z, index) if mix else (z[:1], None)


@torch.no_grad()
def decode_codes(models: VSPBFRModels, codes: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """StyleGAN2 images of W+ codes (K,L,D) with fixed noise, average-pooled to the face size, in [0,1]."""
    out = models.codec.decoder(codes.to(models.dtype), noise=noise).image.float()
    size = models.size
    if out.shape[-1] != size:
        out = F.adaptive_avg_pool2d(out, (size, size))  # official: avg-pool 1024 -> 512
    return ((out + 1) / 2).clamp(0, 1)


def prepare_faces(faces: torch.Tensor, size: int) -> torch.Tensor:
    """Check aligned square faces (N,3,H,H) in [0,1] and resize them to the model's size."""
    if not isinstance(faces, torch.Tensor) or faces.dim() != 4 or faces.shape[1] != 3:
        raise ValueError(f"faces must be a [N,3,H,W] tensor, got {getattr(faces, 'shape', type(faces))}")
    h, w = faces.shape[-2:]
    if h != w:
        raise ValueError(
            f"VSPBFR needs square aligned face crops (FFHQ framing), got {w}x{h}; crop them with "
            "Detect & Crop Faces first"
        )
    if h != size:
        log.info("resizing %d face(s) from %dx%d to the model's %dx%d", faces.shape[0], w, h, size, size)
    # Contiguous: a channels-last view (e.g. a permuted IMAGE) picks other conv kernels, whose
    # rounding differences the networks amplify; one layout keeps a seed's result exact.
    return resize_bchw(faces.float(), size, size).contiguous()


@torch.no_grad()
def _restore_one(models, lq, gens, steps, mixing_prob, trajectory, tick):
    x = (lq * 2 - 1).to(models.device, models.dtype)
    w_lq = models.codec.encoder(x).float()
    codes = sample_codes(models.diffuser, w_lq, steps, gens["start"], on_step=lambda _j: tick())
    w0 = codes[-1].to(models.dtype)
    noise = stylegan_noise(models, gens["stylegan_noise"], x)
    bank = models.codec.decoder(w0, noise=noise).features
    z, index = latent_inputs(models, gens, x, mixing_prob)
    out = models.restoration(x, bank, w0, z, gens["restoration_noise"], inject_index=index)
    restored = ((out.float() + 1) / 2).clamp(0, 1).cpu()
    tick()
    frames = None
    if trajectory:
        # One code at a time: a batch of steps + 1 images at 1024 px would multiply peak memory.
        frames = []
        for code in codes:
            frames.append(decode_codes(models, code, noise).cpu())
            tick()
        frames = torch.cat(frames)
    return restored, codes[-1].float().cpu(), frames


def restore_faces(
    models: VSPBFRModels,
    faces: torch.Tensor,
    seed: int = 0,
    steps: int | None = None,
    return_trajectory: bool = False,
    mixing_prob: float = MIXING_PROB,
) -> VSPBFRResult:
    """Restore aligned faces (N,3,H,H) in [0,1]; ``steps`` defaults to the diffuser's T (4)."""
    if not 0.0 <= mixing_prob <= 1.0:
        raise ValueError(f"mixing_prob must be in [0, 1], got {mixing_prob}")
    steps = models.diffuser.config.timesteps if steps is None else int(steps)
    lq = prepare_faces(faces, models.size)
    # Per face: one tick per diffusion step, one for the restoration, one per trajectory frame.
    units = steps + 1 + (steps + 1 if return_trajectory else 0)
    outs, prompts, frames = [], [], []
    with progress_bar(lq.shape[0] * units, "VSPBFR") as bar:
        for i in range(lq.shape[0]):
            check_interrupted()
            restored, w0, traj = _restore_one(
                models,
                lq[i : i + 1],
                face_generators(seed, i),
                steps,
                mixing_prob,
                return_trajectory,
                bar.update,
            )
            outs.append(restored)
            prompts.append(w0)
            if traj is not None:
                frames.append(traj)
    n, s, layers = lq.shape[0], models.size, models.codec.encoder.config.num_styles
    d = models.restoration.config.style_dim
    return VSPBFRResult(
        torch.cat(outs) if outs else torch.zeros(0, 3, s, s),
        torch.cat(prompts) if prompts else torch.zeros(0, layers, d),
        (torch.stack(frames) if frames else torch.zeros(n, steps + 1, 3, s, s))
        if return_trajectory
        else None,
    )


def restore_photo(
    models: VSPBFRModels,
    photos: torch.Tensor,
    seed: int = 0,
    steps: int | None = None,
    upscale: float = 1.0,
    strength: float = 1.0,
    backend: str = "dlib",
    model_path=None,
    color_correction: str = "none",
    **detect_options,
) -> tuple[torch.Tensor, FaceData, list[str]]:
    """Detect, align (FFHQ framing at the model size), restore every face, blend, paste back.

    Returns (photos, face data, one line per face).
    """
    from .face_pipeline import restore_photos

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")

    def restore(crops: torch.Tensor) -> torch.Tensor:
        out = restore_faces(models, crops, seed, steps).faces
        return strength * out + (1.0 - strength) * crops

    pasted, data = restore_photos(
        photos,
        restore,
        backend=backend,
        model_path=model_path,
        template="ffhq",
        size=models.size,
        detect_options=detect_options,
        upscale=upscale,
        color_correction=color_correction,
    )
    report = [
        f"face {i} (photo {af.face.image_index}, eye distance {af.face.size:.0f} px): restored "
        f"at {models.size} px, seed {seed}"
        for i, af in enumerate(data.faces)
    ]
    return pasted, data, report
