"""Key mapping between diffusers/transformers SD components and the single-file (LDM/sgm) layout.

The single-file layout is what ComfyUI's CheckpointLoaderSimple reads: ``model.diffusion_model.*``
(openaimodel UNet), ``first_stage_model.*`` (LDM autoencoder), ``cond_stage_model.transformer.*``
(SD1.5 CLIP-L in transformers layout) or ``conditioner.embedders.0.transformer.*`` plus
``conditioner.embedders.1.model.*`` (SDXL, the second encoder in open_clip layout).

A mapping is a list of ``KeyOp``s built from the diffusers key names alone. Each op says how one
single-file tensor is made from one or more diffusers tensors and back, so export and import use
the same table and are exact inverses by construction. Text-encoder keys are handled in their
"canonical" transformers-4 form (``text_model.…``); callers translate to the installed
transformers' own names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {
    "sd15": ("cond_stage_model.transformer.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


@dataclass(frozen=True)
class KeyOp:
    """One single-file tensor ``ldm`` made from the diffusers tensors ``src`` by ``kind``."""

    ldm: str
    src: tuple[str, ...]
    kind: str = "same"  # same | conv1x1 (linear <-> 1x1 conv) | transpose | cat (q, k, v fused on dim 0)

    def to_ldm(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Build the single-file tensor from the diffusers state dict."""
        if self.kind == "cat":
            return torch.cat([sd[k] for k in self.src], dim=0)
        t = sd[self.src[0]]
        if self.kind == "conv1x1" and t.dim() == 2:
            return t[:, :, None, None]
        if self.kind == "transpose":
            return t.t()
        return t

    def from_ldm(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split or reshape a single-file tensor back into diffusers tensors."""
        if self.kind == "cat":
            return dict(zip(self.src, t.chunk(len(self.src), dim=0), strict=True))
        if self.kind == "conv1x1":
            t = t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t
        elif self.kind == "transpose":
            t = t.t()
        return {self.src[0]: t}


def _rename(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_name(key: str, per_block: int, up_attention: set[int]) -> str:
    stride = per_block + 1  # LDM counts one extra slot per level for the down/upsampler
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, _rename(rest, _RESNET)) if kind == "resnets" else (1, rest)
        return f"input_blocks.{1 + i * stride + j}.{sub}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_rename(m[3], _RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, _rename(rest, _RESNET)) if kind == "resnets" else (1, rest)
        return f"output_blocks.{i * stride + j}.{sub}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * stride + per_block}.{2 if i in up_attention else 1}.conv.{m[2]}"
    renamed = _rename(key, _UNET_TOP)
    if renamed == key:
        raise ValueError(f"UNet key {key!r} has no single-file equivalent (not an SD1.5/SDXL UNet layout)")
    return renamed


def unet_ops(keys: Iterable[str]) -> list[KeyOp]:
    """Ops for a diffusers UNet2DConditionModel (SD1.5 or SDXL layout) from its key names."""
    keys = list(keys)
    per_block = 1 + max(int(m[1]) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    up_attention = {int(m[1]) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return [KeyOp(UNET_PREFIX + _unet_name(k, per_block, up_attention), (k,)) for k in keys]


def _vae_name(key: str, num_up: int) -> tuple[str, str]:
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = _rename(m[2], _VAE_ATTN)
        return f"{m[1]}.mid.attn_1.{rest}", (
            "conv1x1" if rest.endswith("weight") and "norm" not in rest else "same"
        )
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], {'conv_shortcut': 'nin_shortcut'})}", "same"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], {'conv_shortcut': 'nin_shortcut'})}", "same"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "same"
    # LDM numbers decoder levels from the lowest resolution up, diffusers in execution order.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = _rename(m[3], {"conv_shortcut": "nin_shortcut"})
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{rest}", "same"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}", "same"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}", "same"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key, "same"
    raise ValueError(f"VAE key {key!r} has no single-file equivalent (not an AutoencoderKL layout)")


def vae_ops(keys: Iterable[str]) -> list[KeyOp]:
    """Ops for a diffusers AutoencoderKL from its key names."""
    keys = list(keys)
    num_up = 1 + max(int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    ops = []
    for k in keys:
        name, kind = _vae_name(k, num_up)
        ops.append(KeyOp(VAE_PREFIX + name, (k,), kind))
    return ops


def clip_ops(keys: Iterable[str], prefix: str) -> list[KeyOp]:
    """Ops for a CLIP text encoder kept in transformers layout (SD1.5, SDXL encoder 1)."""
    return [KeyOp(prefix + k, (k,)) for k in keys]


def open_clip_ops(keys: Iterable[str], prefix: str) -> list[KeyOp]:
    """Ops for SDXL's second encoder in open_clip layout: fused in_proj, transposed text_projection."""
    ops = []
    for k in keys:
        if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k):
            base = f"text_model.encoder.layers.{m[1]}.self_attn"
            src = tuple(f"{base}.{p}_proj.{m[2]}" for p in "qkv")
            ops.append(KeyOp(f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}", src, "cat"))
        elif re.fullmatch(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\..+", k):
            continue  # fused into in_proj with q above
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", k):
            ops.append(KeyOp(f"{prefix}transformer.resblocks.{m[1]}.{_rename(m[2], _CLIP_LAYER)}", (k,)))
        elif k == "text_model.embeddings.token_embedding.weight":
            ops.append(KeyOp(prefix + "token_embedding.weight", (k,)))
        elif k == "text_model.embeddings.position_embedding.weight":
            ops.append(KeyOp(prefix + "positional_embedding", (k,)))
        elif k.startswith("text_model.final_layer_norm."):
            ops.append(KeyOp(prefix + "ln_final." + k.rsplit(".", 1)[1], (k,)))
        elif k == "text_projection.weight":
            ops.append(KeyOp(prefix + "text_projection", (k,), "transpose"))
        else:
            raise ValueError(f"text encoder key {k!r} has no open_clip equivalent")
    return ops


def component_ops(kind: str, family: str, keys: Iterable[str]) -> list[KeyOp]:
    """Ops of one component: kind unet, vae, clip (CLIP-L) or clip_proj (SDXL encoder 2)."""
    if kind == "unet":
        return unet_ops(keys)
    if kind == "vae":
        return vae_ops(keys)
    if kind == "clip":
        return clip_ops(keys, CLIP_PREFIXES[family][0])
    return open_clip_ops(keys, CLIP_PREFIXES["sdxl"][1])


def to_single_file(ops: Iterable[KeyOp], sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply ops to a diffusers state dict: single-file tensors by name."""
    return {op.ldm: op.to_ldm(sd) for op in ops}


def from_single_file(ops: Iterable[KeyOp], sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_single_file for the ops' keys (all of them must be present in ``sd``)."""
    out: dict[str, torch.Tensor] = {}
    for op in ops:
        out.update(op.from_ldm(sd[op.ldm]))
    return out
