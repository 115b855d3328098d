"""Loading VSPBFR's official checkpoints (and our safetensors conversions of them).

The released files (Hugging Face ``Wanglong2/VSPBFR``) are ``torch.save`` pickles; they are read
with ``torch.load(weights_only=True)`` through :func:`read_checkpoint`, allowing only
``argparse.Namespace`` (the ``args`` entries; ``opts`` is a plain dict):

* ``style_encoder_decoder.pt``: ``state_dict`` with ``encoder.`` (e4e) and ``decoder.``
  (StyleGAN2 1024) keys, ``latent_avg`` (18x512 or 512) and ``opts``;
* ``code_diffuser.pt``: ``att_mapper`` = the Code_diffuser state dict, whose keys themselves start
  with ``att_mapper.``;
* ``restoration_net.pt``: ``g_ema`` (used at test time), ``g``, ``d``, optimizer states, ``args``.

These formats carry no architecture config, so it is inferred from tensor shapes and then checked
by a strict key/shape match that names every differing key. Converted files are safetensors with
the architecture and config in the metadata (see models/checkpoint.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import ARCH_KEY, Checkpoint, load_weights, read_checkpoint, save_safetensors
from .state_dicts import strip_prefix
from .stylegan2 import StyleGAN2Config, StyleGAN2Generator
from .vspbfr_diffuser import CodeDiffuser, CodeDiffuserConfig
from .vspbfr_encoder import E4EConfig, StyleEncoder
from .vspbfr_restore import RestorationConfig, RestorationNet

logger = logging.getLogger(__name__)

OFFICIAL_ALLOWED_GLOBALS = (argparse.Namespace,)
CODEC_ARCH = "vspbfr_style_codec"
DIFFUSER_ARCH = "vspbfr_code_diffuser"
RESTORATION_ARCH = "vspbfr_restoration"
KINDS = {"state_dict": CODEC_ARCH, "att_mapper": DIFFUSER_ARCH, "g_ema": RESTORATION_ARCH}


class StyleCodec(NamedTuple):
    """The e4e style encoder (with latent_avg) and the StyleGAN2 decoder of one checkpoint."""

    encoder: StyleEncoder
    decoder: StyleGAN2Generator
    opts: dict[str, Any]


# ---------------------------------------------------------------- shape inference


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{what}: expected key {key!r} is missing (got e.g. {sorted(sd)[:5]})")
    return sd[key]


def _channel_args(sd, size: int, ch4: int, what: str) -> dict[str, int]:
    """channel_divisor / channel_multiplier that reproduce the widths stored in ``sd``."""
    if 512 % ch4:
        raise ValueError(f"{what}: 4x4 width {ch4} does not divide 512")
    divisor, multiplier = 512 // ch4, 2
    if size >= 64:  # widths from 64 px on depend on the multiplier; to_rgbs.3 reads the 64 px map
        ch64 = _need(sd, "to_rgbs.3.conv.weight", what).shape[2]
        multiplier = max(1, round(ch64 * divisor / 256))
    return {"channel_divisor": divisor, "channel_multiplier": multiplier}


def _ladder_args(sd: Mapping[str, torch.Tensor], ch4: int, what: str) -> dict:
    """Size, mapping network and channel table shared by the StyleGAN2 and restoration layouts."""
    size = 2 ** (_count(sd, r"to_rgbs\.(\d+)\.bias") + 2)
    return {
        "size": size,
        "style_dim": _need(sd, "style.1.weight", what).shape[1],
        "n_mlp": _count(sd, r"style\.(\d+)\.weight"),
        **_channel_args(sd, size, ch4, what),
    }


def infer_stylegan2_config(sd: Mapping[str, torch.Tensor]) -> StyleGAN2Config:
    """Generator config from a rosinality-layout state dict."""
    what = "StyleGAN2 generator"
    return StyleGAN2Config(**_ladder_args(sd, _need(sd, "conv1.conv.weight", what).shape[1], what))


def infer_e4e_config(sd: Mapping[str, torch.Tensor]) -> E4EConfig:
    """Encoder4Editing config from its state dict (stage widths are assumed to increase)."""
    what = "e4e encoder"
    depths = [
        _need(sd, f"body.{i}.res_layer.1.weight", what).shape[0]
        for i in range(_count(sd, r"body\.(\d+)\.res_layer\.1\.weight"))
    ]
    widths = [d for j, d in enumerate(depths) if j == 0 or d != depths[j - 1]]
    units = [sum(1 for d in depths if d == w) for w in widths]
    if len(widths) != 4:
        raise ValueError(f"{what}: expected 4 backbone stages, found widths {widths}")
    fc1 = _need(sd, "body.0.res_layer.5.fc1.weight", what).shape[0]
    n_convs = _count(sd, r"styles\.0\.convs\.(\d+)\.weight")
    return E4EConfig(
        input_size=16 * 2**n_convs,
        units=tuple(units),
        widths=tuple(widths),
        num_styles=_count(sd, r"styles\.(\d+)\.linear\.weight"),
        input_channels=_need(sd, "input_layer.0.weight", what).shape[1],
        se_reduction=widths[0] // fc1,
    )


def infer_code_diffuser_config(sd: Mapping[str, torch.Tensor]) -> CodeDiffuserConfig:
    """Code diffuser config; the schedule (T=4, 0.1..0.99) is the official test's, not stored."""
    dim = _need(sd, "att_mapper.0.k_matrix.weight", "code diffuser").shape[0]
    return CodeDiffuserConfig(dim=dim, blocks=_count(sd, r"att_mapper\.(\d+)\.k_matrix\.weight"))


def infer_restoration_config(sd: Mapping[str, torch.Tensor]) -> RestorationConfig:
    """Restoration network config from a ``g_ema`` state dict."""
    what = "restoration network"
    return RestorationConfig(**_ladder_args(sd, _need(sd, "conv1.fusion.0.weight", what).shape[0], what))


# ---------------------------------------------------------------- official files


def _entry(ckpt: Checkpoint, key: str) -> dict[str, torch.Tensor]:
    content = ckpt.content
    if not isinstance(content, Mapping) or key not in content:
        got = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise ValueError(f"{ckpt.path} has no {key!r} entry (top-level keys: {got}); not this VSPBFR file?")
    sd = dict(content[key])
    # A DistributedDataParallel wrapper adds 'module.' to every key; the architecture is unchanged.
    if sd and all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    return sd


def _codec_from_official(ckpt: Checkpoint) -> StyleCodec:
    sd = _entry(ckpt, "state_dict")
    content, src = ckpt.content, str(ckpt.path)
    opts = dict(content.get("opts") or {})
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":
        raise ValueError(
            f"{src}: encoder_type {opts['encoder_type']!r} is not supported; expected Encoder4Editing"
        )
    enc_sd, dec_sd = strip_prefix(sd, "encoder."), strip_prefix(sd, "decoder.")
    other = sorted(k for k in sd if not k.startswith(("encoder.", "decoder.")))
    if other:  # the official loader ignores them too (it filters by prefix)
        logger.warning("%s: ignoring %d keys outside encoder./decoder.: %s", src, len(other), other[:10])
    dec_cfg = infer_stylegan2_config(dec_sd)
    if "stylegan_size" in opts and int(opts["stylegan_size"]) != dec_cfg.size:
        raise ValueError(
            f"{src}: opts.stylegan_size={opts['stylegan_size']} but the decoder is {dec_cfg.size} px"
        )
    encoder = StyleEncoder(infer_e4e_config(enc_sd))
    load_weights(encoder.encoder, enc_sd, source=f"{src} [encoder.]")
    decoder = StyleGAN2Generator(dec_cfg)
    load_weights(decoder, dec_sd, source=f"{src} [decoder.]")
    if opts.get("start_from_latent_avg", True):
        if content.get("latent_avg") is None:
            raise ValueError(f"{src}: start_from_latent_avg is set but the file has no latent_avg")
        encoder.set_latent_avg(content["latent_avg"])
    kept = {k: opts[k] for k in ("encoder_type", "stylegan_size", "start_from_latent_avg") if k in opts}
    return StyleCodec(encoder, decoder, kept)


def _diffuser_from_official(ckpt: Checkpoint) -> CodeDiffuser:
    sd = _entry(ckpt, "att_mapper")
    model = CodeDiffuser(infer_code_diffuser_config(sd))
    load_weights(model, sd, source=f"{ckpt.path} [att_mapper]")
    return model


def _restoration_from_official(ckpt: Checkpoint, which: str) -> RestorationNet:
    sd = _entry(ckpt, which)
    model = RestorationNet(infer_restoration_config(sd))
    load_weights(model, sd, source=f"{ckpt.path} [{which}]")
    return model


# ---------------------------------------------------------------- our safetensors


def save_style_codec(codec: StyleCodec, path: str | os.PathLike) -> Path:
    """Write encoder (``encoder.*``, ``latent_avg``) and decoder (``decoder.*``) as one safetensors file."""
    tensors = {f"encoder.{k}": v for k, v in codec.encoder.encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v for k, v in codec.decoder.state_dict().items()})
    tensors["latent_avg"] = codec.encoder.latent_avg
    config = {"encoder": codec.encoder.config.to_dict(), "decoder": codec.decoder.config.to_dict()}
    config["opts"] = dict(codec.opts)
    return save_safetensors(tensors, path, CODEC_ARCH, config)


def save_code_diffuser(model: CodeDiffuser, path: str | os.PathLike) -> Path:
    """Write a code diffuser as safetensors with its config."""
    return save_safetensors(model.state_dict(), path, DIFFUSER_ARCH, model.config.to_dict())


def save_restoration_net(model: RestorationNet, path: str | os.PathLike) -> Path:
    """Write a restoration network as safetensors with its config."""
    return save_safetensors(model.state_dict(), path, RESTORATION_ARCH, model.config.to_dict())


def _config(cls, d: Mapping[str, Any], src: str):
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(d) - known)
    if extra:
        raise ValueError(f"{src}: unknown {cls.__name__} keys {extra}; expected a subset of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _codec_from_safetensors(ckpt: Checkpoint) -> StyleCodec:
    src, cfg, sd = str(ckpt.path), ckpt.config, ckpt.content
    encoder = StyleEncoder(_config(E4EConfig, cfg.get("encoder", {}), src))
    load_weights(encoder.encoder, strip_prefix(sd, "encoder."), source=f"{src} [encoder.]")
    encoder.set_latent_avg(_need(sd, "latent_avg", src))
    decoder = StyleGAN2Generator(_config(StyleGAN2Config, cfg.get("decoder", {}), src))
    load_weights(decoder, strip_prefix(sd, "decoder."), source=f"{src} [decoder.]")
    unknown = sorted(k for k in sd if not k.startswith(("encoder.", "decoder.")) and k != "latent_avg")
    if unknown:
        raise ValueError(f"{src}: unexpected keys {unknown[:10]}")
    return StyleCodec(encoder, decoder, dict(cfg.get("opts", {})))


# ---------------------------------------------------------------- public loaders


def read_vspbfr_file(path: str | os.PathLike) -> Checkpoint:
    """Read a VSPBFR file (official pickles may hold an argparse.Namespace of options, nothing else)."""
    return read_checkpoint(path, allowed_globals=OFFICIAL_ALLOWED_GLOBALS)


def _expect_arch(ckpt: Checkpoint, arch: str) -> None:
    if ckpt.architecture != arch:
        raise ValueError(f"{ckpt.path} holds architecture {ckpt.architecture!r}, expected {arch!r}")


def load_style_codec(path: str | os.PathLike, device: str | torch.device = "cpu") -> StyleCodec:
    """Style encoder + StyleGAN2 decoder from ``style_encoder_decoder.pt`` or its conversion."""
    ckpt = read_vspbfr_file(path)
    if ckpt.metadata.get(ARCH_KEY):
        _expect_arch(ckpt, CODEC_ARCH)
        codec = _codec_from_safetensors(ckpt)
    else:
        codec = _codec_from_official(ckpt)
    return StyleCodec(codec.encoder.to(device).eval(), codec.decoder.to(device).eval(), codec.opts)


def load_code_diffuser(path: str | os.PathLike, device: str | torch.device = "cpu") -> CodeDiffuser:
    """Code diffuser from ``code_diffuser.pt`` or its conversion."""
    ckpt = read_vspbfr_file(path)
    if ckpt.metadata.get(ARCH_KEY):
        _expect_arch(ckpt, DIFFUSER_ARCH)
        model = CodeDiffuser(_config(CodeDiffuserConfig, ckpt.config, str(path)))
        load_weights(model, ckpt.content, source=str(path))
    else:
        model = _diffuser_from_official(ckpt)
    return model.to(device).eval()


def load_restoration_net(
    path: str | os.PathLike, device: str | torch.device = "cpu", which: str = "g_ema"
) -> RestorationNet:
    """Restoration network from ``restoration_net.pt`` (entry ``which``: g_ema or g) or its conversion."""
    ckpt = read_vspbfr_file(path)
    if ckpt.metadata.get(ARCH_KEY):
        _expect_arch(ckpt, RESTORATION_ARCH)
        model = RestorationNet(_config(RestorationConfig, ckpt.config, str(path)))
        load_weights(model, ckpt.content, source=str(path))
    else:
        model = _restoration_from_official(ckpt, which)
    return model.to(device).eval()


def official_kind(ckpt: Checkpoint) -> str:
    """Which official VSPBFR file this is (an architecture name), from its top-level keys."""
    content = ckpt.content
    if isinstance(content, Mapping):
        for key, arch in KINDS.items():
            if key in content:
                return arch
    got = sorted(content) if isinstance(content, Mapping) else type(content).__name__
    raise ValueError(
        f"{ckpt.path} is not a VSPBFR checkpoint: expected one of the entries {sorted(KINDS)}, got {got}"
    )


def convert_official_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert one official VSPBFR ``.pt`` (any of the three) to a PriorFace safetensors file."""
    ckpt = read_vspbfr_file(src)
    if ckpt.metadata.get(ARCH_KEY):
        raise ValueError(f"{src} is already a PriorFace file ({ckpt.architecture}); nothing to convert")
    kind = official_kind(ckpt)
    if kind == CODEC_ARCH:
        out = save_style_codec(_codec_from_official(ckpt), dst)
    elif kind == DIFFUSER_ARCH:
        out = save_code_diffuser(_diffuser_from_official(ckpt), dst)
    else:
        out = save_restoration_net(_restoration_from_official(ckpt, "g_ema"), dst)
    logger.info("converted %s (%s) -> %s", src, kind, out)
    return out
