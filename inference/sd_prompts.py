"""Prompt encoding for SD1.5 and SDXL the way their pipelines do it, plus SDXL's size conditioning.

SD1.5: the final hidden states (after the final layer norm) of CLIP-L. SDXL: the penultimate hidden
states of both encoders concatenated on channels, and encoder 2's projected pooled output. Prompts
are padded/truncated to one 77-token window; "" is the null prompt used for classifier-free guidance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 77


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch of prompts."""

    embeds: torch.Tensor  # [B, 77, C]: C = 768 for SD1.5, 768 + 1280 for SDXL
    pooled: torch.Tensor | None  # [B, P] for SDXL (text_embeds of encoder 2), None for SD1.5


def _token_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    cut = [i for i, seq in enumerate(full) if len(seq) > MAX_TOKENS]
    if cut:
        log.warning("prompt(s) %s longer than %d tokens were truncated", cut, MAX_TOKENS)
    return ids["input_ids"].to(device)


def encode_prompts(parts, prompts: Sequence[str]) -> PromptEmbeds:
    """Encode prompts with the parts' text encoders: SD1.5 last hidden state, SDXL penultimate + pooled.

    Runs under the caller's grad mode: wrap in ``torch.no_grad()`` for inference.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    missing = [i + 1 for i, t in enumerate(parts.tokenizers) if t is None]
    if missing:
        raise ValueError(
            f"no tokenizer for text encoder(s) {missing} of {parts.source}: a single-file checkpoint carries "
            f"none. Pass tokenizer_dirs= to load_sd_parts (a CLIP tokenizer folder with vocab.json and "
            f"merges.txt, e.g. ComfyUI's comfy/sd1_tokenizer) or load a diffusers folder with tokenizer/."
        )
    prompts = list(prompts)
    encoders = parts.text_encoders
    if parts.family == "sd15":
        enc, tok = encoders[0], parts.tokenizers[0]
        ids = _token_ids(tok, prompts, next(enc.parameters()).device)
        return PromptEmbeds(enc(ids).last_hidden_state, None)
    if parts.family != "sdxl":
        raise ValueError(f"unknown family {parts.family!r}; expected 'sd15' or 'sdxl'")
    hidden, pooled = [], None
    for enc, tok in zip(encoders, parts.tokenizers, strict=True):
        out = enc(_token_ids(tok, prompts, next(enc.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def _pair(value, name: str) -> tuple[int, int]:
    if not (
        isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)
    ):
        raise ValueError(f"{name} must be (height, width) as two non-negative ints, got {value!r}")
    return int(value[0]), int(value[1])


def sdxl_time_ids(
    original_size, crop_top_left, target_size, batch: int, device=None, dtype=None
) -> torch.Tensor:
    """SDXL micro-conditioning [B, 6]: original (h, w), crop (top, left), target (h, w)."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    values = (
        *_pair(original_size, "original_size"),
        *_pair(crop_top_left, "crop_top_left"),
        *_pair(target_size, "target_size"),
    )
    ids = torch.tensor([values], dtype=dtype or torch.float32, device=device)
    return ids.repeat(batch, 1)
