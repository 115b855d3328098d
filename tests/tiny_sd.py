"""Tiny random-init SD1.5- and SDXL-shaped components for tests (built from config, no downloads).

Shapes keep the structure of the real models (block types, 8x VAE, two text encoders and the
``text_time`` embedding for SDXL, cross-attention width = text width) at a few channels, so key
layouts and conversions exercise the same paths as the real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# SD1.5 structure at 1/20 width: block channels differ between blocks 1 and 2 like 640/1280.
SD15_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32, 48, 48),
    layers_per_block=2,
    cross_attention_dim=24,
    attention_head_dim=2,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
# SDXL structure: three levels, no attention at the top level, several transformer layers deeper
# down, linear projections, text_time added embedding (6 micro-conditioning numbers + pooled text).
SDXL_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32, 48),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 6),
    cross_attention_dim=40,  # 16 (encoder 1) + 24 (encoder 2), as 768 + 1280 = 2048
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 24,
)
# Four levels like the real VAE, so the latent is 1/8 of the image.
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
TEXT = dict(
    vocab_size=600,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=513,
    eos_token_id=514,
    pad_token_id=514,
)
TEXT_WIDTHS = {"sd15": [24], "sdxl": [16, 24]}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (public BPE convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tiny_tokenizer(folder: Path) -> Path:
    """A character-level CLIP BPE tokenizer (no merges) saved the way diffusers folders hold one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512 + 1
    vocab["<|endoftext|>"] = 512 + 2
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "pad_token": "<|endoftext|>"})
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return folder


def tiny_tokenizer(folder: Path):
    """Load the tiny tokenizer with transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder)))


def tiny_unet(family: str = "sd15", seed: int = 0):
    """Random-init diffusers UNet2DConditionModel shaped like SD1.5 or SDXL."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET)).eval()


def tiny_vae(seed: int = 0):
    """Random-init AutoencoderKL with the real 8x down-sampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE).eval()


def tiny_text_encoders(family: str = "sd15", seed: int = 0) -> list:
    """CLIPTextModel (and, for SDXL, CLIPTextModelWithProjection) at test width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = []
    for i, width in enumerate(TEXT_WIDTHS[family]):
        torch.manual_seed(seed + i)
        cfg = CLIPTextConfig(hidden_size=width, projection_dim=width, **TEXT)
        cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
        encoders.append(cls(cfg).eval())
    return encoders


def save_tiny_diffusers_folder(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (unet, vae, text encoder(s), tokenizer(s), scheduler)."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    tiny_unet(family, seed).save_pretrained(folder / "unet")
    tiny_vae(seed + 10).save_pretrained(folder / "vae")
    names = ["text_encoder", "text_encoder_2"]
    for i, enc in enumerate(tiny_text_encoders(family, seed + 20)):
        enc.save_pretrained(folder / names[i])
        write_tiny_tokenizer(folder / names[i].replace("text_encoder", "tokenizer"))
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    cls = "StableDiffusionPipeline" if family == "sd15" else "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return folder


def write_tiny_configs(folder: Path) -> Path:
    """Diffusers configs of the tiny components as ``<folder>/<family>/<component>/config.json``.

    Pass ``folder`` as ``config_root`` to ``load_sd_parts`` to read tiny single-file checkpoints.
    """
    folder = Path(folder)
    for family in ("sd15", "sdxl"):
        tiny_unet(family).save_config(folder / family / "unet")
        tiny_vae().save_config(folder / family / "vae")
        for name, enc in zip(["text_encoder", "text_encoder_2"], tiny_text_encoders(family), strict=False):
            (folder / family / name).mkdir(parents=True, exist_ok=True)
            enc.config.to_json_file(str(folder / family / name / "config.json"))
    return folder


def tiny_sd_parts(family: str, tokenizer_folder: Path, seed: int = 0):
    """SDParts of tiny random components with tiny tokenizers written to ``tokenizer_folder``."""
    from priorface.inference.sd_checkpoints import SDParts
    from priorface.inference.sd_components import scheduler_config

    encoders = tiny_text_encoders(family, seed + 20)
    tokenizers = [tiny_tokenizer(Path(tokenizer_folder) / f"tok{i}") for i in range(len(encoders))]
    return SDParts(
        family,
        tiny_unet(family, seed),
        tiny_vae(seed + 10),
        encoders,
        tokenizers,
        scheduler_config(family),
        "tiny",
    )
