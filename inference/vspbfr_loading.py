"""VSPBFR's three networks as one bundle: where the files are, loading, device and dtype.

The released checkpoints (Hugging Face ``Wanglong2/VSPBFR``) are three ``torch.save`` files that go
in the ``priorface_vspbfr`` model folder (ComfyUI ``models/priorface/vspbfr``); their PriorFace
safetensors conversions load the same way. On CUDA the networks run in fp16, except the small code
diffuser, which stays fp32: its cost is negligible and the codes feed everything after it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.vspbfr_checkpoints import StyleCodec, load_code_diffuser, load_restoration_net, load_style_codec
from ..models.vspbfr_diffuser import CodeDiffuser
from ..models.vspbfr_restore import RestorationNet
from .device import resolve_device, resolve_dtype
from .model_files import ModelFileNotFoundError, ModelLocator

log = logging.getLogger(__name__)

FOLDER_KEY = "priorface_vspbfr"
DOWNLOAD_FROM = "https://huggingface.co/Wanglong2/VSPBFR"
# Slot -> (official file name, what the file holds).
FILES = {
    "style_codec": (
        "style_encoder_decoder.pt",
        "the e4e style encoder and StyleGAN2 1024 decoder (entries 'state_dict' with encoder./decoder. "
        "keys, 'latent_avg', 'opts')",
    ),
    "code_diffuser": ("code_diffuser.pt", "the W+ code diffuser (entry 'att_mapper')"),
    "restoration_net": ("restoration_net.pt", "the restoration network (entry 'g_ema')"),
}


@dataclass
class VSPBFRModels:
    """Style codec (e4e encoder + StyleGAN2 decoder), code diffuser and restoration network."""

    codec: StyleCodec
    diffuser: CodeDiffuser
    restoration: RestorationNet
    dtype: torch.dtype = torch.float32  # compute dtype of the codec and the restoration network
    name: str = "vspbfr"

    def __post_init__(self):
        check_compatible(self.codec, self.diffuser, self.restoration)

    @property
    def device(self) -> torch.device:
        """Device the networks live on."""
        return next(self.restoration.parameters()).device

    @property
    def size(self) -> int:
        """Side of the faces the restoration network takes and returns (512 for the release)."""
        return self.restoration.config.size


def check_compatible(codec: StyleCodec, diffuser: CodeDiffuser, restoration: RestorationNet) -> None:
    """Raise ValueError naming the mismatch when the three networks cannot work together."""
    enc, dec, rest = codec.encoder.config, codec.decoder.config, restoration.config
    dims = {
        "encoder": enc.style_dim,
        "decoder": dec.style_dim,
        "diffuser": diffuser.config.dim,
        "restoration": rest.style_dim,
    }
    if len(set(dims.values())) != 1:
        raise ValueError(f"the VSPBFR files disagree on the W width: {dims}; were they released together?")
    if enc.num_styles != dec.n_latent or rest.n_latent > enc.num_styles:
        raise ValueError(
            f"W+ layers: encoder {enc.num_styles}, decoder {dec.n_latent}, restoration needs {rest.n_latent}"
        )
    bad = [r for r in range(3, rest.log_size + 1) if dec.channels.get(2**r) != rest.channels[2**r]]
    if dec.size < rest.size or bad:
        raise ValueError(
            f"the StyleGAN2 decoder ({dec.size} px) cannot feed the {rest.size}-px restoration network "
            f"(feature widths differ at {[2**r for r in bad]} px)"
        )


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """'auto' = fp16 on CUDA, fp32 elsewhere; otherwise as inference/device.py decides."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return resolve_dtype(device, precision)


def _load(slot: str, path: Path, fn, device):
    try:
        return fn(path, device)
    except ValueError as e:
        official, what = FILES[slot]
        raise ValueError(f"{path.name} was chosen as {slot} ({what}, officially {official}): {e}") from e


def load_vspbfr_models(
    style_codec: str | os.PathLike,
    code_diffuser: str | os.PathLike,
    restoration_net: str | os.PathLike,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> VSPBFRModels:
    """Load the three files (official .pt or PriorFace safetensors) onto a device in eval mode."""
    dev = resolve_device(device)
    dtype = pick_dtype(dev, precision)
    codec = _load("style_codec", Path(style_codec), load_style_codec, dev)
    diffuser = _load("code_diffuser", Path(code_diffuser), load_code_diffuser, dev)
    restoration = _load("restoration_net", Path(restoration_net), load_restoration_net, dev)
    codec = StyleCodec(codec.encoder.to(dtype), codec.decoder.to(dtype), codec.opts)
    log.info("VSPBFR loaded on %s (%s; code diffuser fp32)", dev, dtype)
    return VSPBFRModels(codec, diffuser.float(), restoration.to(dtype), dtype, Path(restoration_net).stem)


def resolve_vspbfr_files(locator: ModelLocator, **names: str) -> dict[str, Path]:
    """Paths of the chosen files per slot; a missing one names the file, the folders and its content."""
    unknown = sorted(set(names) - set(FILES))
    if unknown:
        raise ValueError(f"unknown VSPBFR file slots {unknown}; expected {sorted(FILES)}")
    paths = {}
    for slot, name in names.items():
        official, what = FILES[slot]
        try:
            paths[slot] = locator.resolve(FOLDER_KEY, name)
        except ModelFileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}\nThe {slot} file holds {what}. Download {official} from {DOWNLOAD_FROM} "
                f"(or use its PriorFace safetensors conversion)."
            ) from None
    return paths


def file_choices(locator: ModelLocator, slot: str) -> list[str]:
    """Files of the VSPBFR folder for one slot, the likeliest first; the official name if the folder is empty."""
    official, _ = FILES[slot]
    found = locator.list(FOLDER_KEY)
    if not found:
        return [official]
    stem = Path(official).stem

    def rank(name: str) -> tuple[int, str]:
        own = Path(name).stem
        return (0 if own == stem else 1 if stem.split("_")[0] in own else 2, name.lower())

    return sorted(found, key=rank)
