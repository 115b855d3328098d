"""PRIORFACE_PRIORS: the priors of a batch of faces, any subset of them, with their provenance.

Every prior is optional. Tensors are batch-first and on CPU, float32 unless stated:

- ``caption`` / ``description`` / ``prompt_high`` / ``prompt_low``: one string per image.
- ``caption_embedding`` / ``description_embedding``: :class:`TextEmbedding` (token sequence
  ``[B,T,D]``, attention mask ``[B,T]``, pooled ``[B,D]``).
- ``mask``: facial semantic label map as one-hot ``[B,K,H,W]`` in {0,1}; ``mask_labels`` names the
  K classes (e.g. background, skin, brows, eyes, nose, mouth, hair).
- ``depth``: ``[B,1,H,W]`` in [0,1], normalised per face (1 = nearest).
- ``landmarks``: ``[B,5,2]`` pixel coordinates in the face crop (face_types.LANDMARK_NAMES order).

``sources`` records, per prior name, which extractor produced it and with which settings, so a
model trained on one kind of prior can refuse another kind (see :func:`check_compatible`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

TEXT_PRIORS = ("caption", "description", "prompt_high", "prompt_low")
TENSOR_PRIORS = ("caption_embedding", "description_embedding", "mask", "depth", "landmarks")


@dataclass
class TextEmbedding:
    """Token embeddings of a batch of texts, their attention mask, and a pooled vector per text."""

    tokens: torch.Tensor  # [B,T,D]
    attention_mask: torch.Tensor  # [B,T], 1 for real tokens
    pooled: torch.Tensor  # [B,D]

    def select(self, index: list[int]) -> TextEmbedding:
        """The embeddings of some images of the batch."""
        return TextEmbedding(self.tokens[index], self.attention_mask[index], self.pooled[index])


@dataclass
class PriorBundle:
    """Priors for a batch of ``batch_size`` faces (see module docstring for shapes)."""

    batch_size: int
    caption: list[str] | None = None
    description: list[str] | None = None
    prompt_high: list[str] | None = None
    prompt_low: list[str] | None = None
    caption_embedding: TextEmbedding | None = None
    description_embedding: TextEmbedding | None = None
    mask: torch.Tensor | None = None
    mask_labels: tuple[str, ...] | None = None
    depth: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None
    sources: dict[str, dict] = field(default_factory=dict)

    def present(self) -> list[str]:
        """Names of the priors that are set."""
        return [
            f.name
            for f in fields(self)
            if f.name in TEXT_PRIORS + TENSOR_PRIORS and getattr(self, f.name) is not None
        ]

    def with_prior(self, name: str, value, source: dict) -> PriorBundle:
        """A copy with one prior set (or replaced) and its provenance recorded."""
        if name not in TEXT_PRIORS + TENSOR_PRIORS:
            raise ValueError(f"unknown prior {name!r}; expected one of {TEXT_PRIORS + TENSOR_PRIORS}")
        n = (
            len(value)
            if isinstance(value, list)
            else (value.tokens.shape[0] if isinstance(value, TextEmbedding) else value.shape[0])
        )
        if n != self.batch_size:
            raise ValueError(f"prior {name!r} has {n} item(s) but the bundle holds {self.batch_size} face(s)")
        return replace(self, **{name: value}, sources={**self.sources, name: dict(source)})


class PriorMismatchError(ValueError):
    """A model was given priors from a different extractor than it was trained with."""


def check_compatible(
    trained_with: dict[str, dict], bundle: PriorBundle, model_name: str = "model"
) -> list[str]:
    """Names of usable priors; raise PriorMismatchError when a prior came from another extractor.

    ``trained_with`` maps prior name -> {"extractor": id, ...} as recorded in a checkpoint. Priors the
    model was not trained with are ignored (returned list excludes them); a prior whose extractor
    id differs is refused with a message naming both.
    """
    usable = []
    for name in bundle.present():
        if name not in trained_with:
            continue
        want = trained_with[name].get("extractor")
        got = bundle.sources.get(name, {}).get("extractor")
        if want != got:
            raise PriorMismatchError(
                f"{model_name} was trained with '{name}' priors from {want!r}, but this '{name}' comes from "
                f"{got!r}; features from another extractor mean something else to the network. Use {want!r} "
                f"for '{name}', or leave '{name}' out (the model then runs without it)."
            )
        usable.append(name)
    return usable
