"""Tiny random-init VSPBFR networks for tests (the structure of the release at 32 px and width 32).

Shared by the pipeline and node tests; ``write_official_files`` saves them in the three official
``torch.save`` layouts (style_encoder_decoder.pt, code_diffuser.pt, restoration_net.pt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from priorface.inference.vspbfr_loading import VSPBFRModels
from priorface.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from priorface.models.vspbfr_checkpoints import StyleCodec
from priorface.models.vspbfr_diffuser import CodeDiffuser, CodeDiffuserConfig
from priorface.models.vspbfr_encoder import E4EConfig, StyleEncoder
from priorface.models.vspbfr_restore import RestorationConfig, RestorationNet

SG = StyleGAN2Config(size=32, style_dim=32, n_mlp=2, channel_divisor=16)
RN = RestorationConfig(size=32, style_dim=32, n_mlp=2, channel_divisor=16)
E4E = E4EConfig(input_size=64, units=(1, 1, 1, 1), widths=(8, 16, 24, 32), num_styles=8, se_reduction=4)
CD = CodeDiffuserConfig(dim=32, blocks=2)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero biases, noise strengths and BN statistics, so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
    return module.eval()


def build(cls, cfg, seed: int = 0) -> torch.nn.Module:
    """A tiny network with seeded random weights."""
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def tiny_models(seed: int = 0) -> VSPBFRModels:
    """Style codec, code diffuser and restoration network at tiny size, fp32 on CPU."""
    enc = build(StyleEncoder, E4E, seed + 1)
    enc.set_latent_avg(
        torch.randn(E4E.num_styles, E4E.style_dim, generator=torch.Generator().manual_seed(seed))
    )
    codec = StyleCodec(enc, build(StyleGAN2Generator, SG, seed + 2), {"encoder_type": "Encoder4Editing"})
    return VSPBFRModels(codec, build(CodeDiffuser, CD, seed + 3), build(RestorationNet, RN, seed + 4))


def write_official_files(models: VSPBFRModels, folder: Path) -> dict[str, Path]:
    """Save the bundle as the three official files; returns slot -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    enc, dec = models.codec.encoder, models.codec.decoder
    state = {f"encoder.{k}": v for k, v in enc.encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": SG.size, "start_from_latent_avg": True}
    args = argparse.Namespace(size=SG.size, batch=1)
    content = {
        "style_codec": (
            "style_encoder_decoder.pt",
            {"state_dict": state, "latent_avg": enc.latent_avg, "opts": opts},
        ),
        "code_diffuser": ("code_diffuser.pt", {"att_mapper": models.diffuser.state_dict(), "args": args}),
        "restoration_net": ("restoration_net.pt", {"g_ema": models.restoration.state_dict(), "args": args}),
    }
    paths = {}
    for slot, (name, obj) in content.items():
        paths[slot] = folder / name
        torch.save(obj, paths[slot])
    return paths
