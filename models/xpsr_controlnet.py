"""XPSR ControlNet: diffusers ControlNetModel + Semantic-Fusion Attention + training-only heads.

Built on diffusers' own ``ControlNetModel`` (0.42): the stock modules keep their stock names and
the XPSR extras are attached beside them, so ``state_dict()`` keys are exactly the official ones
(``qyp2000/XPSR``, saved by diffusers 0.21.4):

- ``down_blocks.{0,1,2}.attentions_lowlevel.{0,1}`` / ``attentions_connect.{0,1}`` and
  ``mid_block.attentions_lowlevel.0`` / ``attentions_connect.0``: the SFA transformers
  (see models/xpsr_attention.py). Lowlevel copies the config of its ``attentions`` sibling; connect
  too, with ``cross_attention_dim`` = block channels.
- ``controlnet_cond_embedding.to_rgbs.{0,1,2}``: PASD's RGB heads, 3x3 conv after each stride-2 conv
  of the conditioning embedding (channels 32, 96, 256 -> 3), i.e. RGB at 1/2, 1/4, 1/8 of the control
  image. ``conv_out`` stays diffusers' zero-initialised conv.
- ``conv_degradation.{0..11}.0`` and ``conv_degradation_mid.0``: 3x3 conv C -> latent channels on
  each zero-conv output (before ``conditioning_scale``), predicting the HR latent (DFC loss).

The class is created on first use (:func:`xpsr_controlnet_class`) because diffusers is imported
lazily in this pack. Only SD1.5/SD2-shaped configs are supported (no class/addition embeddings).
The RGB/latent heads are training-only; inference may ignore them. Gradient checkpointing is
not implemented in the SFA forward.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .xpsr_attention import check_sd15_shape, check_sfa_mode, semantic_fusion, timestep_embedding

logger = logging.getLogger(__name__)

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # PASD/XPSR conditioning embedding widths
# Extra fields of the official controlnet/config.json and the only values implemented here.
OFFICIAL_FLAGS = {
    "return_rgbs": True,
    "use_rrdb": False,
    "use_lowlevel_prompt": True,
    "use_latent_pred": True,
}
SFA_PREFIXES = ("attentions_lowlevel", "attentions_connect")


@dataclass
class XPSRControlNetOutput:
    """ControlNet residuals for the UNet plus the DFC head predictions (training only)."""

    down_block_res_samples: tuple[torch.Tensor, ...]  # 12 residuals for SD1.5, already scaled
    mid_block_res_sample: torch.Tensor
    rgbs: tuple[torch.Tensor, ...]  # RGB at 1/2, 1/4, 1/8 of the control image (unscaled, ~[-1, 1] target)
    latent_preds: tuple[torch.Tensor, ...]  # one latent per down residual (HR latent target)
    latent_pred_mid: torch.Tensor


def _transformer_config(transformer: nn.Module, **changes) -> dict[str, Any]:
    # Private keys such as `_use_default_values` would make from_config reset real values.
    cfg = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    cfg.update(changes)
    return cfg


def add_xpsr_modules(model: nn.Module) -> None:
    """Attach SFA transformers, RGB heads and latent heads to a stock diffusers ControlNetModel."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    check_sd15_shape(model.config, "ControlNet")
    if getattr(model.mid_block, "attentions", None) is None:
        raise ValueError(f"XPSR needs a cross-attention mid block, got {type(model.mid_block).__name__}")
    for block in [*model.down_blocks, model.mid_block]:
        attns = getattr(block, "attentions", None)
        if attns is None:
            continue  # DownBlock2D: no cross-attention, no SFA
        block.attentions_lowlevel = nn.ModuleList(
            Transformer2DModel.from_config(_transformer_config(a)) for a in attns
        )
        block.attentions_connect = nn.ModuleList(
            Transformer2DModel.from_config(_transformer_config(a, cross_attention_dim=a.config.in_channels))
            for a in attns
        )
    emb = model.controlnet_cond_embedding
    widths = [blk.out_channels for blk in emb.blocks[1::2]]  # outputs of the stride-2 convs
    emb.to_rgbs = nn.ModuleList(nn.Conv2d(c, 3, 3, padding=1) for c in widths)
    latent = model.config.in_channels
    model.conv_degradation = nn.ModuleList(
        nn.Sequential(nn.Conv2d(z.out_channels, latent, 3, padding=1)) for z in model.controlnet_down_blocks
    )
    model.conv_degradation_mid = nn.Sequential(
        nn.Conv2d(model.controlnet_mid_block.out_channels, latent, 3, padding=1)
    )


def embed_condition(emb: nn.Module, cond: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """PASD conditioning embedding: (features for conv_in, RGB images after each stride-2 conv)."""
    x = nn.functional.silu(emb.conv_in(cond))
    rgbs = []
    for i, block in enumerate(emb.blocks):
        x = nn.functional.silu(block(x))
        if i % 2 == 1:  # after conv (c -> c', stride 2) + SiLU
            rgbs.append(emb.to_rgbs[i // 2](x))
    return emb.conv_out(x), tuple(rgbs)


def _sfa_layer(block, i, h, high, low, mode, kw):
    attns = (block.attentions[i], block.attentions_lowlevel[i], block.attentions_connect[i])
    return semantic_fusion(h, *attns, high, low, mode, kw)


def _sfa_down_block(block, h, temb, high, low, mode, kw):
    outputs = ()
    for i, resnet in enumerate(block.resnets):
        h = resnet(h, temb)
        h = _sfa_layer(block, i, h, high, low, mode, kw)
        outputs += (h,)
    for down in block.downsamplers or ():
        h = down(h)
        outputs += (h,)
    return h, outputs


def _sfa_mid_block(block, h, temb, high, low, mode, kw):
    h = block.resnets[0](h, temb)
    for i, resnet in enumerate(block.resnets[1:]):
        h = _sfa_layer(block, i, h, high, low, mode, kw)
        h = resnet(h, temb)
    return h


def controlnet_forward(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    lowlevel_encoder_hidden_states: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    sfa_mode: str = "parallel",
    guess_mode: bool = False,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> XPSRControlNetOutput:
    """XPSR ControlNet pass: ``controlnet_cond`` is the upsampled LR image in [0, 1] (B, 3, 8h, 8w)."""
    check_sfa_mode(sfa_mode)
    if controlnet_cond.shape[-2:] != tuple(8 * s for s in sample.shape[-2:]):
        raise ValueError(
            f"controlnet_cond must be 8x the latent size {tuple(sample.shape[-2:])}, got {tuple(controlnet_cond.shape[-2:])}"
        )
    if model.config.controlnet_conditioning_channel_order == "bgr":
        controlnet_cond = torch.flip(controlnet_cond, dims=[1])
    temb = timestep_embedding(model, sample, timestep)
    cond, rgbs = embed_condition(model.controlnet_cond_embedding, controlnet_cond)
    h = model.conv_in(sample) + cond
    high, low, kw = encoder_hidden_states, lowlevel_encoder_hidden_states, cross_attention_kwargs
    residuals = (h,)
    for block in model.down_blocks:
        if hasattr(block, "attentions_lowlevel"):
            h, outs = _sfa_down_block(block, h, temb, high, low, sfa_mode, kw)
        else:
            h, outs = block(hidden_states=h, temb=temb)
        residuals += outs
    h = _sfa_mid_block(model.mid_block, h, temb, high, low, sfa_mode, kw)

    down = tuple(zero(r) for zero, r in zip(model.controlnet_down_blocks, residuals, strict=True))
    mid = model.controlnet_mid_block(h)
    # Latent heads read the zero-conv outputs before conditioning_scale (official order).
    latent_preds = tuple(head(r) for head, r in zip(model.conv_degradation, down, strict=True))
    latent_mid = model.conv_degradation_mid(mid)
    if guess_mode and not model.config.global_pool_conditions:
        scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
        down = tuple(r * s for r, s in zip(down, scales[:-1], strict=True))
        mid = mid * scales[-1]
    else:
        down = tuple(r * conditioning_scale for r in down)
        mid = mid * conditioning_scale
    if model.config.global_pool_conditions:
        down = tuple(r.mean(dim=(2, 3), keepdim=True) for r in down)
        mid = mid.mean(dim=(2, 3), keepdim=True)
    return XPSRControlNetOutput(down, mid, rgbs, latent_preds, latent_mid)


def init_sfa_from_unet(controlnet: nn.Module, unet: nn.Module) -> list[str]:
    """Copy SD weights like the official ``from_unet``; returns the SFA keys left at random init.

    Stock parts (conv_in, time embedding, down/mid blocks) are copied as diffusers does. Each
    ``attentions_lowlevel``/``attentions_connect`` tensor takes the ``attentions`` tensor of the same
    name; a tensor whose shape differs stays random (official: dropped, then ``strict=False``). For
    SD1.5 that is exactly ``attentions_connect.*.attn2.to_k/to_v.weight`` (C x C, SD has C x 768).
    """
    controlnet.conv_in.load_state_dict(unet.conv_in.state_dict())
    controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    left_random = []
    for name in ("down_blocks", "mid_block"):
        src, dst = getattr(unet, name).state_dict(), getattr(controlnet, name)
        new = {}
        for key, value in dst.state_dict().items():
            from_key = key
            for prefix in SFA_PREFIXES:
                from_key = from_key.replace(f"{prefix}.", "attentions.")
            if from_key not in src:
                raise ValueError(
                    f"UNet has no weight {name}.{from_key} to initialise ControlNet {name}.{key}"
                )
            if src[from_key].shape == value.shape:
                new[key] = src[from_key]
            else:
                left_random.append(f"{name}.{key}")
        missing, unexpected = dst.load_state_dict(new, strict=False)
        if unexpected or sorted(f"{name}.{k}" for k in missing) != sorted(
            k for k in left_random if k.startswith(f"{name}.")
        ):
            raise RuntimeError(
                f"initialising {name} from the UNet failed: missing {missing}, unexpected {unexpected}"
            )
    return left_random


@functools.cache
def xpsr_controlnet_class() -> type:
    """The ``XPSRControlNetModel`` class (a diffusers ControlNetModel subclass), built on first use."""
    from diffusers import ControlNetModel

    class XPSRControlNetModel(ControlNetModel):
        """ControlNetModel with XPSR's SFA transformers and DFC heads; see models/xpsr_controlnet.py."""

        @functools.wraps(ControlNetModel.__init__)  # keeps the signature diffusers' from_config reads
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_xpsr_modules(self)
            self.sfa_mode = "parallel"  # default for forward(); not part of the weights

        @classmethod
        def from_unet(
            cls,
            unet,
            conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
            load_weights_from_unet=True,
            **kwargs,
        ):
            """Build from an SD UNet; with weights, copy them the official way (see init_sfa_from_unet)."""
            model = super().from_unet(
                unet,
                conditioning_embedding_out_channels=conditioning_embedding_out_channels,
                load_weights_from_unet=False,
                **kwargs,
            )
            if load_weights_from_unet:
                model.random_init_keys = init_sfa_from_unet(model, unet)
                logger.info(
                    "XPSR ControlNet: %d SFA tensors left at random init", len(model.random_init_keys)
                )
            return model

        def forward(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            lowlevel_encoder_hidden_states=None,
            conditioning_scale=1.0,
            sfa_mode=None,
            guess_mode=False,
            cross_attention_kwargs=None,
        ):
            """See :func:`controlnet_forward`; ``sfa_mode`` defaults to ``self.sfa_mode``."""
            return controlnet_forward(
                self, sample, timestep, encoder_hidden_states, controlnet_cond, lowlevel_encoder_hidden_states,
                conditioning_scale, sfa_mode or self.sfa_mode, guess_mode, cross_attention_kwargs,
            )  # fmt: skip

    return XPSRControlNetModel


def build_xpsr_controlnet(config: dict[str, Any]) -> nn.Module:
    """An XPSR ControlNet from a diffusers ControlNet config dict (random init)."""
    # Private keys (`_use_default_values`, ...) describe another class's construction: drop them.
    return xpsr_controlnet_class().from_config({k: v for k, v in config.items() if not k.startswith("_")})
