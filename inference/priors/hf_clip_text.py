"""CLIP text embeddings of caption/description priors, with chunking for texts over 77 tokens.

A CLIP text encoder sees 77 positions: BOS, up to 75 tokens, EOS, padding. A longer text is split
into consecutive 75-token chunks, each wrapped as BOS + chunk + EOS + padding and encoded on its
own; the chunks' token sequences are concatenated (``[B, 77*n, D]``) and their pooled vectors
averaged (the approach of Stable Diffusion front ends for long prompts). The attention mask is 1
on BOS, text tokens and EOS, 0 on padding. The encoder itself runs without a mask, as Stable
Diffusion does: CLIP attention is causal, so padding never changes the real tokens' outputs.
In a batch, texts with fewer chunks are filled up with the encoding of an empty text, masked 0.

Pooled: ``text_embeds`` (projected) for CLIPTextModelWithProjection folders (SDXL's second
encoder, full CLIP models), ``pooler_output`` for plain CLIPTextModel folders (SD1.5).
"""

from __future__ import annotations

import torch

from .bundle import PriorBundle, TextEmbedding
from .hf_loading import HFModel, in_mini_batches

_EMBEDDING_OF = {"caption": "caption_embedding", "description": "description_embedding"}


def chunk_token_ids(hf: HFModel, text: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, attention mask) of each 77-token window of ``text``; an empty text gives one."""
    tok = hf.processor
    window = hf.model.config.max_position_embeddings
    body = window - 2
    # verbose=False: texts longer than 77 tokens are expected here, the warning would mislead.
    ids = tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    out = []
    for chunk in chunks:
        row = [tok.bos_token_id, *chunk, tok.eos_token_id]
        out.append((row + [pad] * (window - len(row)), [1] * len(row) + [0] * (window - len(row))))
    return out


def _encode_rows(hf: HFModel, rows: list[list[int]], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    def run(part: slice):
        ids = torch.tensor(rows[part], dtype=torch.long, device=hf.device)
        out = hf.model(input_ids=ids)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state.float().cpu(), pooled.float().cpu()

    parts = list(in_mini_batches(len(rows), batch_size, "PriorFace CLIP text", run))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def encode_texts(hf: HFModel, texts: list[str], batch_size: int = 8) -> TextEmbedding:
    """CLIP embeddings of a list of texts: tokens [B,77*n,D], mask [B,77*n], pooled [B,D] (float32, CPU)."""
    hf.require(("clip_text",), "text encoding")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"text encoding expects a non-empty list of strings, got {texts!r:.200}")
    per_text = [chunk_token_ids(hf, t) for t in texts]
    empty = chunk_token_ids(hf, "")[0]
    n_max = max(len(c) for c in per_text)
    rows = [ids for chunks in per_text for ids, _ in chunks] + [empty[0]]
    hidden, pooled = _encode_rows(hf, rows, batch_size)
    window = hidden.shape[1]
    tokens = hidden[-1].repeat(len(texts), n_max, 1)  # filler: the empty text's encoding
    mask = torch.zeros(len(texts), n_max * window, dtype=torch.long)
    pools, row = [], 0
    for b, chunks in enumerate(per_text):
        n = len(chunks)
        tokens[b, : n * window] = hidden[row : row + n].reshape(n * window, -1)
        mask[b, : n * window] = torch.tensor([m for _, m in chunks]).flatten()
        pools.append(pooled[row : row + n].mean(dim=0))
        row += n
    return TextEmbedding(tokens, mask, torch.stack(pools))


def add_text_embedding(
    bundle: PriorBundle, hf: HFModel, source: str = "caption", batch_size: int = 8
) -> PriorBundle:
    """A copy of ``bundle`` with the CLIP embedding of its ``source`` texts (caption or description)."""
    if source not in _EMBEDDING_OF:
        raise ValueError(f"source must be one of {tuple(_EMBEDDING_OF)}, got {source!r}")
    texts = getattr(bundle, source)
    if texts is None:
        raise ValueError(
            f"the priors hold no '{source}' texts to encode (present: {bundle.present() or 'none'}); "
            f"run a caption/description extractor first"
        )
    emb = encode_texts(hf, texts, batch_size)
    settings = {
        "source": source,
        "source_extractor": bundle.sources.get(source, {}).get("extractor"),
        "window": hf.model.config.max_position_embeddings,
        "long_text": "75-token chunks, sequences concatenated, pooled averaged",
        "pooled": "text_embeds" if hasattr(hf.model, "text_projection") else "pooler_output",
    }
    return bundle.with_prior(_EMBEDDING_OF[source], emb, {"extractor": hf.extractor_id, "settings": settings})
