"""XPSR UNet: SD UNet2DConditionModel + PASD pixel-aware cross-attention (``pixel_attentions``).

Every resnet layer of every up block (4 x 3 for SD1.5) gets a ``Transformer2DModel`` applied after
the resnet and, in ``CrossAttnUpBlock2D``, after the text transformer. Its cross-attention keys are
the ControlNet residual that is also added to that layer's skip connection, flattened to
(B, H*W, C_skip), popped from the end like the skips. So ``cross_attention_dim`` = skip channels
(SD1.5: up0 1280,1280,1280; up1 1280,1280,640; up2 640,640,320; up3 320,320,320), heads = the
block's head count, head dim = block channels / heads. They are randomly initialised (official).
The ControlNet residuals are also added to the skips and the mid block as in a stock ControlNet.
Without ControlNet residuals the pixel attentions are skipped and the model is the SD UNet.

Design: a subclass of diffusers' ``UNet2DConditionModel`` (so stock key names, ``from_config`` and
``save_pretrained`` work) with ``pixel_attentions`` attached to the stock up blocks and a forward
of its own. The forward reuses the stock down/mid block forwards and only re-implements the up-block
loop from the blocks' public parts (``resnets``, ``attentions``, ``upsamplers``). That is less fragile
than subclassing diffusers' up blocks (whose constructors and forwards change between releases) and
than monkey-patching their forwards. FreeU, gradient checkpointing, adapters and SDXL embeddings
are not supported (SD1.5/SD2 configs only). The released XPSR UNet has no SFA (its config flags
``*_use_lowlevel_prompt`` are false), so ``lowlevel_encoder_hidden_states`` is accepted and ignored.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .xpsr_attention import check_sd15_shape, image_tokens, run_transformer, timestep_embedding

logger = logging.getLogger(__name__)


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def add_pixel_attentions(unet: nn.Module) -> None:
    """Attach ``up_blocks.{i}.pixel_attentions.{j}`` to a stock diffusers UNet2DConditionModel."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    cfg = unet.config
    check_sd15_shape(cfg, "UNet")
    n = len(cfg.block_out_channels)
    channels = list(reversed(cfg.block_out_channels))
    heads = list(reversed(_per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)))
    layers = list(reversed(_per_block(cfg.transformer_layers_per_block, n)))
    only_cross = list(reversed(_per_block(cfg.only_cross_attention, n)))
    for i, block in enumerate(unet.up_blocks):
        out, skip_in = channels[i], channels[min(i + 1, n - 1)]
        count = len(block.resnets)
        block.pixel_attentions = nn.ModuleList(
            Transformer2DModel(
                heads[i],
                out // heads[i],
                in_channels=out,
                num_layers=layers[i],
                cross_attention_dim=skip_in if j == count - 1 else out,  # channels of the popped skip
                norm_num_groups=cfg.norm_num_groups,
                use_linear_projection=cfg.use_linear_projection,
                only_cross_attention=only_cross[i],
                upcast_attention=cfg.upcast_attention,
            )
            for j in range(count)
        )


def _up_block(block, h, skips, controls, temb, text, kw, upsample_size):
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for j, (resnet, attn) in enumerate(zip(block.resnets, attentions, strict=True)):
        h = resnet(torch.cat([h, skips[-1 - j]], dim=1), temb)
        if attn is not None:
            h = run_transformer(attn, h, text, kw)
        if controls is not None:
            h = run_transformer(block.pixel_attentions[j], h, image_tokens(controls[-1 - j]), kw)
    for up in block.upsamplers or ():
        h = up(h, upsample_size)
    return h


def unet_forward(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Noise prediction; with ControlNet residuals they are added to the skips and keyed by pixel attention."""
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
        raise ValueError(
            "pass both down_block_additional_residuals and mid_block_additional_residual, or neither"
        )
    controls = tuple(down_block_additional_residuals) if down_block_additional_residuals is not None else None
    factor = 2**unet.num_upsamplers
    forward_size = any(s % factor for s in sample.shape[-2:])
    temb = timestep_embedding(unet, sample, timestep)
    text, kw = encoder_hidden_states, cross_attention_kwargs
    h = unet.conv_in(sample)
    skips = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=text, cross_attention_kwargs=kw)
        else:
            h, res = block(hidden_states=h, temb=temb)
        skips += res
    if controls is not None:
        if len(controls) != len(skips):
            raise ValueError(f"expected {len(skips)} ControlNet down residuals, got {len(controls)}")
        skips = tuple(s + c for s, c in zip(skips, controls, strict=True))
    h = unet.mid_block(h, temb, encoder_hidden_states=text, cross_attention_kwargs=kw)
    if controls is not None:
        h = h + mid_block_additional_residual
    for i, block in enumerate(unet.up_blocks):
        k = len(block.resnets)
        block_skips, skips = skips[-k:], skips[:-k]
        block_controls = None
        if controls is not None:
            block_controls, controls = controls[-k:], controls[:-k]
        size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
        h = _up_block(block, h, block_skips, block_controls, temb, text, kw, size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


@functools.cache
def xpsr_unet_class() -> type:
    """The ``XPSRUNet2DConditionModel`` class (a diffusers UNet2DConditionModel subclass), built on first use."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    class XPSRUNet2DConditionModel(UNet2DConditionModel):
        """UNet2DConditionModel with PASD pixel attentions in the up blocks; see models/xpsr_unet.py."""

        @functools.wraps(UNet2DConditionModel.__init__)  # keeps the signature diffusers' from_config reads
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_pixel_attentions(self)

        def forward(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=None,
            mid_block_additional_residual=None,
            cross_attention_kwargs=None,
            lowlevel_encoder_hidden_states=None,
            return_dict=True,
        ):
            """See :func:`unet_forward`; returns ``UNet2DConditionOutput`` like diffusers (or a 1-tuple)."""
            out = unet_forward(
                self, sample, timestep, encoder_hidden_states, down_block_additional_residuals,
                mid_block_additional_residual, cross_attention_kwargs,
            )  # fmt: skip
            return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    return XPSRUNet2DConditionModel


def build_xpsr_unet(config: dict[str, Any]) -> nn.Module:
    """An XPSR UNet from a diffusers UNet2DConditionModel config dict (random init)."""
    return xpsr_unet_class().from_config({k: v for k, v in config.items() if not k.startswith("_")})


def xpsr_unet_from_sd(sd_unet: nn.Module) -> nn.Module:
    """XPSR UNet holding a copy of an SD UNet's weights; the pixel attentions stay randomly initialised."""
    unet = build_xpsr_unet(dict(sd_unet.config))
    missing, unexpected = unet.load_state_dict(sd_unet.state_dict(), strict=False)
    if unexpected or any(".pixel_attentions." not in k for k in missing):
        raise ValueError(
            f"SD UNet does not match the XPSR UNet config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if (sd_unet.device, sd_unet.dtype) != (unet.device, unet.dtype):
        unet = unet.to(device=sd_unet.device, dtype=sd_unet.dtype)
    return unet


def freeze_for_xpsr_training(unet: nn.Module, controlnet: nn.Module) -> list[nn.Parameter]:
    """Official trainable set: the whole ControlNet + the UNet's pixel attentions; returns those params."""
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith("pixel_attentions"):
            module.requires_grad_(True)
    controlnet.requires_grad_(True)
    return [p for m in (controlnet, unet) for p in m.parameters() if p.requires_grad]
