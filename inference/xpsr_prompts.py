"""XPSR prompts: the texts of both guidance branches, and their text embeddings.

XPSR conditions on two prompts, both through the SD1.5 CLIP text encoder (papers.md section 3.7,
official ``test.py`` and ``pipelines/pipeline_xpsr.py``, qyp2000/XPSR):

- high-level: the MLLM's content caption of the LR image, plus ``" " + added_prompt``; its
  classifier-free-guidance negative is ``negative_prompt``;
- low-level: the MLLM's quality description of the LR image; its negative is hard-coded in the
  official pipeline as :data:`LOWLEVEL_NEGATIVE_PROMPT` (editable here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# configs/xpsr_test.yaml (the argparse fallbacks in test.py are shorter: "clean, high-resolution, 8k").
ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
# pipelines/pipeline_xpsr.py, negative of the low-level prompt under CFG.
LOWLEVEL_NEGATIVE_PROMPT = "high resolution, best quality, clear"


@dataclass(frozen=True)
class XPSRPrompts:
    """Texts for a batch: one high/low-level prompt per image (or one for all) and shared negatives."""

    high: tuple[str, ...] = ("",)
    low: tuple[str, ...] = ("",)
    added: str = ADDED_PROMPT
    negative: str = NEGATIVE_PROMPT
    low_negative: str = LOWLEVEL_NEGATIVE_PROMPT

    def __post_init__(self):
        if not self.high or not self.low:
            raise ValueError(
                "XPSR prompts need at least one high-level and one low-level text (may be empty)"
            )
        if len(self.high) != len(self.low) and 1 not in (len(self.high), len(self.low)):
            raise ValueError(
                f"got {len(self.high)} high-level and {len(self.low)} low-level prompts; expected equal "
                "counts or one of them shared by all images"
            )

    @property
    def count(self) -> int:
        """How many images these prompts describe (1 = shared by any batch)."""
        return max(len(self.high), len(self.low))

    def for_image(self, index: int, batch: int) -> tuple[str, str]:
        """(full high-level prompt, low-level prompt) of image ``index`` of a batch of ``batch``."""
        if self.count not in (1, batch):
            raise ValueError(
                f"the prompts describe {self.count} image(s) but {batch} image(s) are being restored; "
                "make the prompts from these same images (or use one prompt for all)"
            )
        high = self.high[index if len(self.high) > 1 else 0]
        low = self.low[index if len(self.low) > 1 else 0]
        return join_prompt(high, self.added), " ".join(low.split())


def join_prompt(caption: str, added: str) -> str:
    """The official composition ``caption + " " + added`` (empty parts dropped, newlines flattened)."""
    parts = [" ".join(p.split()) for p in (caption, added)]
    return " ".join(p for p in parts if p)


def prompts_from_texts(
    high: Sequence[str] | None,
    low: Sequence[str] | None,
    typed_high: str = "",
    typed_low: str = "",
    added: str = ADDED_PROMPT,
    negative: str = NEGATIVE_PROMPT,
    low_negative: str = LOWLEVEL_NEGATIVE_PROMPT,
) -> XPSRPrompts:
    """Prompts from per-image texts (e.g. the priors' prompt_high/prompt_low); typed text wins when not empty."""
    high_t = (typed_high,) if typed_high.strip() or not high else tuple(high)
    low_t = (typed_low,) if typed_low.strip() or not low else tuple(low)
    return XPSRPrompts(high_t, low_t, added, negative, low_negative)


@dataclass
class XPSRConditioning:
    """Text embeddings of one image: positive and negative, high- and low-level, each (1, T, D)."""

    high: torch.Tensor
    low: torch.Tensor
    high_negative: torch.Tensor
    low_negative: torch.Tensor

    def to(self, device: torch.device | str) -> XPSRConditioning:
        """The same embeddings on ``device``."""
        return XPSRConditioning(
            *(t.to(device) for t in (self.high, self.low, self.high_negative, self.low_negative))
        )

    def branches(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low) embeddings of the model batch: [negative, positive] under CFG, else positive only."""
        if not guided:
            return self.high, self.low
        return torch.cat([self.high_negative, self.high]), torch.cat([self.low_negative, self.low])


TextEncoder = Callable[[list[str]], torch.Tensor]  # texts -> (N, T, D) token embeddings


def encode_conditioning(
    encode: TextEncoder, prompts: XPSRPrompts, index: int, batch: int
) -> XPSRConditioning:
    """Embeddings of image ``index``'s four texts, in one call of the text encoder."""
    high, low = prompts.for_image(index, batch)
    embeds = encode([high, low, prompts.negative, prompts.low_negative])
    if embeds.dim() != 3 or embeds.shape[0] != 4:
        raise ValueError(f"the text encoder must return (4, T, D) for 4 texts, got {tuple(embeds.shape)}")
    return XPSRConditioning(*(e[None] for e in embeds))
