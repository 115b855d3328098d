"""XPSR Semantic-Fusion Attention (SFA), a query-chunked attention processor, shared XPSR helpers.

SFA (Qu et al., ECCV 2024; wiring as in the official code ``qyp2000/XPSR``) sits in every
cross-attention layer of the XPSR ControlNet's down blocks 0-2 and its mid block. Three complete
diffusers ``Transformer2DModel``s share one layer slot: ``attentions[i]`` (the SD transformer, keyed on
the high-level prompt), ``attentions_lowlevel[i]`` (same shape, keyed on the low-level prompt) and
``attentions_connect[i]`` (same, but its cross-attention keys/values are the *image tokens* of the
low-level branch, so ``cross_attention_dim`` = block channels C). Modes (:data:`SFA_MODES`):

- ``"parallel"`` (the official code and the paper's SFA): ``h_high = high(h, c_high)`` and
  ``h_low = low(h, c_low)`` from the same ``h``, then ``connect(h_high, tokens(h_low))``.
- ``"serial"``: our reading of a serial chain (the ablation the parallel design is argued against,
  paper Eq. 1 read as "inject one prompt after the other"): ``low(high(h, c_high), c_low)``. The
  low-level transformer sees the high-level result instead of ``h``; ``attentions_connect`` is unused.
- ``"high_only"``: ``high(h, c_high)``, i.e. a plain ControlNet layer (low-level prompt ablated).
- ``"low_only"``: ``low(h, c_low)`` (high-level prompt ablated).

Whenever the low-level tokens are ``None`` every mode falls back to ``high(h, c_high)``, as the
official blocks do.

Memory: ``connect`` attends HW x HW (4096 x 4096 at the 64x64 level of a 512 px image), exactly like
every SD self-attention ``attn1``. diffusers' default processor ``AttnProcessor2_0`` (torch SDPA) uses
fused kernels that never materialise the score matrix where one is available (flash/mem-efficient on
CUDA, flash on CPU for float inputs without a mask); :class:`ChunkedAttnProcessor` bounds memory on
any backend by running SDPA over query chunks. Measured figures: run ``python -m
priorface.models.xpsr_attention``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SFA_MODES = ("parallel", "serial", "high_only", "low_only")
# Modules holding dense HW x HW cross-attention: the SFA fusion layers and PASD's pixel attentions.
DENSE_ATTENTION_MODULES = ("attentions_connect", "pixel_attentions")


def check_sfa_mode(mode: str) -> str:
    """Return ``mode`` or raise ValueError listing the valid SFA modes."""
    if mode not in SFA_MODES:
        raise ValueError(f"unknown SFA mode {mode!r}; expected one of {SFA_MODES}")
    return mode


def image_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens, the layout of ``encoder_hidden_states``."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def run_transformer(
    transformer: nn.Module,
    h: torch.Tensor,
    context: torch.Tensor,
    cross_attention_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Call a diffusers Transformer2DModel on feature map ``h`` with cross-attention ``context``."""
    return transformer(
        h, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs, return_dict=False
    )[0]


def semantic_fusion(
    h: torch.Tensor,
    high: nn.Module,
    low: nn.Module,
    connect: nn.Module,
    high_states: torch.Tensor,
    low_states: torch.Tensor | None,
    mode: str = "parallel",
    cross_attention_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """One SFA layer on ``h`` (B, C, H, W); see the module docstring for the four modes."""
    check_sfa_mode(mode)
    kw = cross_attention_kwargs
    if low_states is None or mode == "high_only":
        return run_transformer(high, h, high_states, kw)
    if mode == "low_only":
        return run_transformer(low, h, low_states, kw)
    h_high = run_transformer(high, h, high_states, kw)
    if mode == "serial":
        return run_transformer(low, h_high, low_states, kw)
    h_low = run_transformer(low, h, low_states, kw)
    return run_transformer(connect, h_high, image_tokens(h_low), kw)


class ChunkedAttnProcessor:
    """diffusers attention processor: torch SDPA over query chunks, so scores stay chunk x keys.

    Numerically the same as ``AttnProcessor2_0`` (softmax rows are independent); peak memory of the
    attention scores is ``heads * chunk_size * keys`` instead of ``heads * queries * keys`` when SDPA
    falls back to its math kernel (masks, some dtypes/devices, backward of the math path).
    """

    def __init__(self, chunk_size: int = 1024):
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """Attention of ``attn`` (a diffusers ``Attention``) with the query split into chunks."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial is not None:
            b, c, hh, ww = spatial
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        batch, queries = hidden_states.shape[:2]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        chunks = []
        for start in range(0, queries, self.chunk_size):
            stop = min(start + self.chunk_size, queries)
            mask = None
            if attention_mask is not None:
                # A mask broadcast over queries has a length-1 query axis; otherwise slice it.
                mask = attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., start:stop, :]
            chunks.append(F.scaled_dot_product_attention(query[:, :, start:stop], key, value, attn_mask=mask))
        out = torch.cat(chunks, dim=2)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(spatial)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention_processor(
    model: nn.Module, processor: Any, module_names: Iterable[str] | None = DENSE_ATTENTION_MODULES
) -> int:
    """Give the attention layers under the named submodules (all layers for None) ``processor``; returns how many.

    Sets processors one by one instead of ``set_attn_processor(dict)`` (which empties the dict
    passed in, wants every layer of the model listed, and does not exist on Transformer2DModel).
    """
    names = None if module_names is None else tuple(module_names)
    count = 0
    for name, module in model.named_modules():
        if not hasattr(module, "set_processor"):
            continue
        if names is None or any(f".{n}." in f".{name}." for n in names):
            module.set_processor(processor)
            count += 1
    return count


def check_sd15_shape(config: Mapping[str, Any], what: str) -> None:
    """Raise ValueError for config features the XPSR forwards do not implement (SDXL-only parts)."""
    unsupported = {
        "class_embed_type": None,
        "num_class_embeds": None,
        "addition_embed_type": None,
        "encoder_hid_dim_type": None,
        "encoder_hid_dim": None,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "center_input_sample": False,
    }
    bad = {k: config[k] for k, want in unsupported.items() if config.get(k, want) != want}
    if bad:
        raise ValueError(
            f"XPSR {what} supports SD1.5/SD2-shaped configs only; these must be unset, got {bad}"
        )


def timestep_embedding(
    model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float | int
) -> torch.Tensor:
    """Sinusoidal projection + MLP of ``model.time_proj``/``model.time_embedding``, batch-broadcast."""
    t = torch.as_tensor(timestep, device=sample.device)
    if t.ndim == 0:
        t = t[None]
    t_emb = model.time_proj(t.expand(sample.shape[0]))
    # time_proj always returns float32; the MLP may run in half precision.
    return model.time_embedding(t_emb.to(sample.dtype))


def peak_memory_mib(fn: Callable[[], Any]) -> float:
    """Extra resident memory (MiB) reached while ``fn`` runs (Linux; resets the peak-RSS counter)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM (peak RSS) to the current RSS

    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    before = rss("VmRSS")
    fn()
    return (rss("VmHWM") - before) / 2**20


# (layer, processor, with backward) cases of the memory report; one fresh process each.
_CASES = [
    *[(layer, proc, False) for layer in ("plain", "fusion") for proc in ("classic", "sdpa", "chunked")],
    ("sfa", "sdpa", False),
    ("plain", "sdpa", True),
    ("fusion", "sdpa", True),
    ("fusion", "chunked", True),
]
_LAYERS = {
    "plain": "plain ControlNet cross-attn layer (keys: 77x768 text)",
    "fusion": "SFA fusion layer attentions_connect (keys: HWxC)",
    "sfa": "whole SFA layer (high + low + connect)",
}


def _measure(case: int, size: int = 64, channels: int = 320, heads: int = 8, chunk: int = 512) -> str:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    layer, proc_name, train = _CASES[case]
    proc = {"classic": AttnProcessor(), "sdpa": AttnProcessor2_0(), "chunked": ChunkedAttnProcessor(chunk)}[
        proc_name
    ]
    torch.manual_seed(0)
    h = torch.randn(1, channels, size, size, requires_grad=train)
    text, low = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    plain = [
        Transformer2DModel(heads, channels // heads, channels, cross_attention_dim=768) for _ in range(2)
    ]
    connect = Transformer2DModel(heads, channels // heads, channels, cross_attention_dim=channels)
    for m in (*plain, connect):
        set_attention_processor(m, proc, None)
    tokens = torch.randn(1, size * size, channels)
    run = {
        "plain": lambda: run_transformer(plain[0], h, text),
        "fusion": lambda: run_transformer(connect, h, tokens),
        "sfa": lambda: semantic_fusion(h, plain[0], plain[1], connect, text, low),
    }[layer]
    step = (lambda: run().sum().backward()) if train else run
    with torch.set_grad_enabled(train):
        step()  # warm-up: kernel and allocator caches
        t0 = time.perf_counter()
        mib = peak_memory_mib(step)
    what = "fwd+bwd" if train else "forward"
    return f"{_LAYERS[layer]:53s} {proc_name:8s} {what:8s} peak +{mib:7.1f} MiB {time.perf_counter() - t0:6.2f} s"


def _memory_report() -> list[str]:
    import os
    import subprocess
    import sys

    # Big buffers through mmap, so a freed buffer leaves the RSS and peaks are not hidden by reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    lines = [
        f"64x64 latent, C=320, 8 heads, batch 1, float32, CPU, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}; classic = AttnProcessor (no SDPA), "
        "sdpa = AttnProcessor2_0, chunked = ChunkedAttnProcessor(512)"
    ]
    for i in range(len(_CASES)):
        cmd = [sys.executable, "-m", __spec__.name, str(i)]
        lines.append(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip())
    return lines


if __name__ == "__main__":
    import sys

    print(_measure(int(sys.argv[1])) if len(sys.argv) > 1 else "\n".join(_memory_report()))
