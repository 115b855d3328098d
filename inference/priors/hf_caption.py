"""BLIP-2 captions of face crops (the ``caption`` prior), and text generation shared with LLaVA."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .bundle import PriorBundle
from .hf_loading import HFModel, check_bchw, in_mini_batches, to_uint8_list


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings; ``num_beams=1`` is greedy search. Sampling is never used (reproducible)."""

    max_new_tokens: int = 30
    num_beams: int = 1

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        if not 1 <= self.num_beams <= 16:
            raise ValueError(f"num_beams must be in 1..16, got {self.num_beams}")


def _strip_prompt(out: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    # Decoder-only generate() returns prompt + answer; keep the answer only.
    n = prompt_ids.shape[1]
    if out.shape[1] >= n and torch.equal(out[:, :n].cpu(), prompt_ids.cpu()):
        return out[:, n:]
    return out


def generate_texts(hf: HFModel, inputs, prompt_ids: torch.Tensor, options: GenerationOptions) -> list[str]:
    """Run deterministic generation on processed ``inputs`` and decode the new tokens to strings."""
    out = hf.model.generate(
        **inputs.to(hf.device, dtype=hf.dtype),
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        do_sample=False,
    )
    answers = _strip_prompt(out, prompt_ids)
    return [t.strip() for t in hf.processor.batch_decode(answers, skip_special_tokens=True)]


def _blip2_start_ids(hf: HFModel, batch: int) -> torch.Tensor:
    # What Blip2ForConditionalGeneration.generate feeds the language model when given no text.
    cfg = hf.model.config
    start = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
    return torch.tensor([start] * batch, dtype=torch.long)


def caption_images(
    hf: HFModel,
    images: torch.Tensor,
    options: GenerationOptions | None = None,
    prompt: str = "",
    batch_size: int = 4,
) -> list[str]:
    """One BLIP-2 caption per image of a [B,3,H,W] batch in [0,1]; ``prompt`` is an optional prefix.

    The returned text is what the model adds after the prompt (the prompt itself is left out).
    """
    hf.require(("blip2",), "captioning")
    check_bchw(images, "captioning")
    options = options or GenerationOptions()
    arrays = to_uint8_list(images)

    def run(part: slice) -> list[str]:
        chunk = arrays[part]
        if prompt.strip():
            inputs = hf.processor(images=chunk, text=[prompt.strip()] * len(chunk), return_tensors="pt")
            prompt_ids = inputs["input_ids"]
        else:
            inputs = hf.processor(images=chunk, return_tensors="pt")
            prompt_ids = _blip2_start_ids(hf, len(chunk))
        return generate_texts(hf, inputs, prompt_ids, options)

    return [
        t
        for texts in in_mini_batches(len(arrays), batch_size, "PriorFace BLIP-2 captions", run)
        for t in texts
    ]


def add_captions(
    bundle: PriorBundle,
    hf: HFModel,
    images: torch.Tensor,
    options: GenerationOptions | None = None,
    prompt: str = "",
    batch_size: int = 4,
) -> PriorBundle:
    """A copy of ``bundle`` with BLIP-2 captions as the ``caption`` prior, provenance recorded."""
    options = options or GenerationOptions()
    texts = caption_images(hf, images, options, prompt, batch_size)
    settings = {**asdict(options), "prompt": prompt.strip()}
    return bundle.with_prior("caption", texts, {"extractor": hf.extractor_id, "settings": settings})
