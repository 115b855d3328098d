"""Segment Anything (SAM) checkpoints: architecture inferred from the weights, built, loaded, cached.

Official files (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) are
plain state dicts with keys ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*``. The
file name is never trusted: every hyperparameter is read from tensor shapes, so a renamed file or
a small custom SAM (tests use one) loads the same way:

- image encoder: ``patch_embed.proj.weight`` [D,3,p,p] gives the width D and patch p;
  ``pos_embed`` [1,G,G,D] the image size G*p; the ``blocks.N`` indices the depth; each block's
  ``attn.rel_pos_h`` [2*s-1, D/heads] its head count and attention span s: s = G marks a global
  attention block, a smaller s a windowed block of that window size; ``mlp.lin1`` the MLP ratio
  and ``neck.0`` the output width (SAM's prompt dimension). Relative position tables are required
  (every official file has them): without them the head count is not recoverable.
- prompt encoder: ``point_embeddings.0.weight`` [1,C] and ``mask_downscaling.3`` (mask channels).
- mask decoder: ``mask_tokens`` [outputs+1, C]; ``transformer.layers.N`` the depth and
  ``mlp.lin1`` its MLP width; ``cross_attn_token_to_image.q_proj`` the attention downsampling;
  ``iou_prediction_head.layers.N`` its depth and width. Its head count does not appear in any
  shape: it is 8 in every official file and is assumed to be 8.

A file whose config equals one of SAM's published ViT-B/L/H configs is named by that variant
(``vit_b`` ...), anything else is ``custom``. segment_anything's own modules build the network
(imported lazily: the package pulls in torchvision); weights are read with
``models.checkpoint.read_checkpoint`` (``torch.load(weights_only=True)`` or safetensors) and
loaded with a strict, by-name key report. Loaded models are cached per file (path, mtime, size).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...models.checkpoint import KeyMismatchError, KeyReport, load_weights, read_checkpoint

log = logging.getLogger(__name__)

_ENC = "image_encoder."
_PROMPT = "prompt_encoder."
_DEC = "mask_decoder."
DECODER_HEADS = 8  # not visible in any shape; 8 in every published SAM

# The published configs (segment_anything/build_sam.py): width, depth, heads, global blocks.
OFFICIAL_ENCODERS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
# What the three published files share besides the encoder.
_OFFICIAL_COMMON = dict(
    image_size=1024,
    patch_size=16,
    window_size=14,
    mlp_ratio=4.0,
    prompt_embed_dim=256,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    attention_downsample_rate=2,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=256,
)


@dataclass(frozen=True)
class SamConfig:
    """Hyperparameters of a SAM network, all recoverable from its state dict's shapes."""

    encoder_embed_dim: int  # ViT width: 768 / 1024 / 1280
    encoder_depth: int  # number of ViT blocks
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]  # blocks with global (not windowed) attention
    image_size: int = 1024  # side of SAM's square input
    patch_size: int = 16
    window_size: int = 14  # side of the attention windows of the other blocks
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256  # image embedding / prompt token width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def variant(self) -> str:
        """'vit_b', 'vit_l' or 'vit_h' when this is a published config, else 'custom'."""
        for name, (dim, depth, heads, global_idx) in OFFICIAL_ENCODERS.items():
            official = SamConfig(dim, depth, heads, global_idx, **_OFFICIAL_COMMON)
            if self == official:
                return name
        return "custom"


@dataclass
class LoadedSam:
    """PRIORFACE_SAM: a SAM network with the config and file it came from."""

    model: torch.nn.Module  # segment_anything.modeling.Sam, eval mode
    config: SamConfig
    path: Path

    @property
    def variant(self) -> str:
        """Published variant name or 'custom'."""
        return self.config.variant

    @property
    def extractor_id(self) -> str:
        """Provenance id of masks made with this model: ``sam:<variant>:<file stem>``."""
        return f"sam:{self.variant}:{self.path.stem}"


def _need(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise KeyMismatchError(KeyReport(missing=[key]), "this SAM state dict (needed to infer its config)")
    return state[key]


def _indices(state: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _count(state: dict, prefix: str) -> int:
    found = _indices(state, prefix)
    if found != list(range(len(found))) or not found:
        raise ValueError(f"SAM state dict: '{prefix}N' indices must run 0..N-1, got {found}")
    return len(found)


def _encoder_attention(state: dict, dim: int, depth: int, grid: int) -> tuple[int, tuple[int, ...], int]:
    """(heads, global block indices, window size) from each block's relative position table."""
    heads, global_idx, windows = set(), [], set()
    for i in range(depth):
        key = f"{_ENC}blocks.{i}.attn.rel_pos_h"
        if key not in state:
            raise ValueError(
                f"SAM state dict has no {key}: PriorFace needs relative position tables (every published "
                "SAM has them) to infer the encoder's head count and attention windows"
            )
        span, head_dim = state[key].shape
        if dim % head_dim:
            raise ValueError(f"{key} has width {head_dim}, which does not divide the encoder width {dim}")
        heads.add(dim // head_dim)
        size = (span + 1) // 2
        # A window as large as the whole token grid is global attention (identical computation).
        if size == grid:
            global_idx.append(i)
        else:
            windows.add(size)
    if len(heads) != 1 or len(windows) > 1:
        raise ValueError(f"SAM encoder blocks disagree: head counts {heads}, window sizes {windows}")
    return heads.pop(), tuple(global_idx), windows.pop() if windows else 0


def infer_sam_config(state: dict[str, torch.Tensor]) -> SamConfig:
    """Read a SAM config from a state dict's shapes (see module docstring for which key says what)."""
    patch = _need(state, f"{_ENC}patch_embed.proj.weight")
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    if channels != 3:
        raise ValueError(f"SAM image encoder must take 3 channels, its patch embedding takes {channels}")
    pos = _need(state, f"{_ENC}pos_embed")
    if pos.dim() != 4 or pos.shape[1] != pos.shape[2] or pos.shape[3] != dim:
        raise ValueError(f"{_ENC}pos_embed must be [1,G,G,{dim}], got {list(pos.shape)}")
    grid = pos.shape[1]
    depth = _count(state, f"{_ENC}blocks.")
    heads, global_idx, window = _encoder_attention(state, dim, depth, grid)
    mlp_hidden = _need(state, f"{_ENC}blocks.0.mlp.lin1.weight").shape[0]
    out_chans = _need(state, f"{_ENC}neck.0.weight").shape[0]
    prompt_dim = _need(state, f"{_PROMPT}point_embeddings.0.weight").shape[1]
    mask_tokens = _need(state, f"{_DEC}mask_tokens.weight")
    if not (out_chans == prompt_dim == mask_tokens.shape[1]):
        raise ValueError(
            f"SAM widths disagree: encoder neck {out_chans}, prompt encoder {prompt_dim}, "
            f"mask decoder {mask_tokens.shape[1]}"
        )
    q_width = _need(state, f"{_DEC}transformer.layers.0.cross_attn_token_to_image.q_proj.weight").shape[0]
    config = SamConfig(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_idx,
        image_size=grid * patch_size,
        patch_size=patch_size,
        window_size=window,
        mlp_ratio=mlp_hidden / dim,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=_need(state, f"{_PROMPT}mask_downscaling.3.weight").shape[0],
        decoder_depth=_count(state, f"{_DEC}transformer.layers."),
        decoder_mlp_dim=_need(state, f"{_DEC}transformer.layers.0.mlp.lin1.weight").shape[0],
        attention_downsample_rate=prompt_dim // q_width,
        num_multimask_outputs=mask_tokens.shape[0] - 1,
        iou_head_depth=_count(state, f"{_DEC}iou_prediction_head.layers."),
        iou_head_hidden_dim=_need(state, f"{_DEC}iou_prediction_head.layers.0.weight").shape[0],
    )
    for width in (prompt_dim, q_width):
        if width % DECODER_HEADS:
            raise ValueError(
                f"SAM mask decoder attention width {width} is not divisible by {DECODER_HEADS} heads "
                "(the head count of every published SAM, assumed for all files)"
            )
    return config


def build_sam(config: SamConfig) -> torch.nn.Module:
    """A randomly initialised segment_anything ``Sam`` network for ``config`` (eval mode)."""
    from segment_anything.modeling import (  # lazy: imports torchvision (~2 s)
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = config.image_size // config.patch_size
    encoder = ImageEncoderViT(
        depth=config.encoder_depth,
        embed_dim=config.encoder_embed_dim,
        img_size=config.image_size,
        mlp_ratio=config.mlp_ratio,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.encoder_num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.encoder_global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.prompt_embed_dim,
    )
    prompt = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=DECODER_HEADS,
            attention_downsample_rate=config.attention_downsample_rate,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def sam_state_dict(content, source: str) -> dict[str, torch.Tensor]:
    """The SAM state dict inside a checkpoint's content, or a ValueError saying what was found."""
    if isinstance(content, dict) and not any(str(k).startswith(_ENC) for k in content):
        for wrapper in ("model", "state_dict"):  # training scripts sometimes nest the weights
            if isinstance(content.get(wrapper), dict):
                content = content[wrapper]
                break
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{source} is not a SAM state dict (got {type(content).__name__})")
    if not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{source} holds non-tensor values; expected a SAM state dict of tensors")
    prefixes = {str(k).split(".")[0] + "." for k in content}
    if not {_ENC, _DEC} <= prefixes:
        sample = ", ".join(sorted(map(str, content))[:5])
        raise ValueError(
            f"{source} is not a segment-anything checkpoint: expected keys under {_ENC}*, {_PROMPT}* and "
            f"{_DEC}*, found e.g. {sample}. HQ-SAM, MobileSAM and SAM 2 files are other architectures."
        )
    return content


def sam_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> tuple:
    """(network with the weights loaded, config) for a SAM state dict; key mismatches named."""
    config = infer_sam_config(state)
    model = build_sam(config)
    load_weights(model, state, source=source)
    return model.eval(), config


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime: float, size: int, device: str) -> LoadedSam:
    # mtime and size are part of the key so that a replaced file is loaded again.
    state = sam_state_dict(read_checkpoint(path).content, path)
    model, config = sam_from_state_dict(state, source=path)
    log.info("SAM %s (%s) from %s", config.variant, asdict(config), path)
    return LoadedSam(model.to(device).float(), config, Path(path))


def load_sam(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedSam:
    """Load (or reuse the cached) SAM from a ``.pth``/``.pt``/``.safetensors`` file, fp32."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    stat = path.stat()
    return _cached(str(path), stat.st_mtime, stat.st_size, str(torch.device(device)))
