"""LLaVA 1.5 / LLaVA-NeXT descriptions of face crops, with the instructions each method uses.

Presets (``INSTRUCTIONS``) and the prior each fills by default (``DEFAULT_TARGETS``):

- ``xpsr_high``: XPSR's high-level prompt (image content) -> ``prompt_high``.
- ``xpsr_low``: XPSR's low-level prompt (image quality) -> ``prompt_low``.
- ``llvfsr``: LLV-FSR's facial description -> ``description``.
- ``authface_tags``: AuthFace-style photography-guided tags (semantic + photographic) -> ``caption``.
- ``custom``: the caller's own instruction -> ``description``.

The instruction goes through the folder's chat template (``chat_template.jinja``/``.json``); a
folder without one gets LLaVA 1.5's ``USER: <image>\\n... ASSISTANT:`` format and a warning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from .bundle import TEXT_PRIORS, PriorBundle
from .hf_caption import GenerationOptions, generate_texts
from .hf_loading import HFModel, check_bchw, in_mini_batches, to_uint8_list

log = logging.getLogger(__name__)

INSTRUCTIONS: dict[str, str] = {
    # XPSR (Qi et al. 2024), the two prompts given to LLaVA in the paper.
    "xpsr_high": "Please provide a descriptive summary of the content of this image",
    "xpsr_low": (
        "Please describe the quality of this image and evaluate it based on factors such as clarity, "
        "color, noise, and lighting"
    ),
    # Ours: LLV-FSR wants facial attributes that guide restoration, not scene content.
    "llvfsr": (
        "Describe the visible facial features of the person in this image that would help restore the "
        "face: gender, approximate age, skin tone, face shape, eyes, eyebrows, nose, mouth and lips, "
        "hair style and colour, facial hair, glasses or other accessories, and expression. "
        "Only mention what you can see, in one short paragraph."
    ),
    # Ours: AuthFace conditions on tag lists mixing content and photographic properties.
    "authface_tags": (
        "Write comma-separated tags for this photo of a face. First semantic tags: gender, age, "
        "expression, hair, facial hair, accessories, clothing. Then photographic tags: lighting (for "
        "example soft light, hard light, studio lighting, natural light, backlight), focus (for example "
        "sharp focus, shallow depth of field, bokeh), shot type (for example close-up, headshot, "
        "portrait, half body), camera angle and colour tone. Output only the tags."
    ),
}
PRESETS = (*INSTRUCTIONS, "custom")
DEFAULT_TARGETS = {
    "xpsr_high": "prompt_high",
    "xpsr_low": "prompt_low",
    "llvfsr": "description",
    "authface_tags": "caption",
    "custom": "description",
}
_FALLBACK_TEMPLATE = "USER: <image>\n{instruction} ASSISTANT:"


def instruction_for(preset: str, custom: str = "") -> str:
    """The instruction text of a preset; ``custom`` uses the caller's text, which must not be empty."""
    if preset == "custom":
        if not custom.strip():
            raise ValueError("preset 'custom' needs an instruction text; got an empty one")
        return custom.strip()
    if preset not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction preset {preset!r}; expected one of {PRESETS}")
    return INSTRUCTIONS[preset]


def build_prompt(hf: HFModel, instruction: str) -> str:
    """One user turn (image + instruction) through the folder's chat template, ready for generation."""
    processor = hf.processor
    if getattr(processor, "chat_template", None):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
        ]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    log.warning("%s has no chat template; using the LLaVA 1.5 prompt format", hf.folder)
    return _FALLBACK_TEMPLATE.format(instruction=instruction)


def describe_images(
    hf: HFModel,
    images: torch.Tensor,
    instruction: str,
    options: GenerationOptions | None = None,
    batch_size: int = 2,
) -> list[str]:
    """One LLaVA answer to ``instruction`` per image of a [B,3,H,W] batch in [0,1]."""
    hf.require(("llava", "llava_next"), "image description")
    check_bchw(images, "image description")
    options = options or GenerationOptions(max_new_tokens=120)
    prompt = build_prompt(hf, instruction)
    arrays = to_uint8_list(images)

    def run(part: slice) -> list[str]:
        chunk = arrays[part]
        inputs = hf.processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        return generate_texts(hf, inputs, inputs["input_ids"], options)

    batches = in_mini_batches(len(arrays), batch_size, "PriorFace LLaVA descriptions", run)
    return [t for texts in batches for t in texts]


def add_descriptions(
    bundle: PriorBundle,
    hf: HFModel,
    images: torch.Tensor,
    preset: str = "llvfsr",
    custom_instruction: str = "",
    target: str = "auto",
    options: GenerationOptions | None = None,
    batch_size: int = 2,
) -> tuple[PriorBundle, list[str]]:
    """Describe the images with a preset and store the texts in ``target`` ('auto': the preset's prior)."""
    instruction = instruction_for(preset, custom_instruction)
    name = DEFAULT_TARGETS[preset] if target == "auto" else target
    if name not in TEXT_PRIORS:
        raise ValueError(f"target must be 'auto' or one of {TEXT_PRIORS}, got {target!r}")
    options = options or GenerationOptions(max_new_tokens=120)
    texts = describe_images(hf, images, instruction, options, batch_size)
    settings = {**asdict(options), "preset": preset, "instruction": instruction}
    return bundle.with_prior(name, texts, {"extractor": hf.extractor_id, "settings": settings}), texts
