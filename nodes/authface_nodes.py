"""AuthFace nodes: load stage I SDXL + stage II ControlNet, restore aligned faces, restore whole photos."""

from __future__ import annotations

from pathlib import Path

from ..inference.authface_restore import DEFAULT_SIZE, restore_faces, restore_photo
from ..inference.authface_sampler import SCHEDULERS, START_MODES, AuthFaceSettings
from ..inference.color_correction import COLOR_CORRECTIONS
from ..inference.device import PRECISIONS
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.model_files import MODEL_KINDS, ModelFileNotFoundError
from . import comfy_bridge
from .face_nodes import EMBEDDED_DETECTOR, detector_choices, resolve_detector
from .node_inputs import upscale_input

MODEL_TYPE = "PRIORFACE_AUTHFACE"
_CATEGORY = "PriorFace/AuthFace"
# Where each part is looked for, in this order (our folder first, then the ecosystem's).
SDXL_KEYS = ("priorface_authface", "checkpoints", "diffusers")
CONTROLNET_KEYS = ("priorface_authface", "controlnet")
_SINGLE_FILES = (".safetensors", ".sft")
SDXL_EXPECTED = (
    "the AuthFace stage I SDXL: a single-file SDXL checkpoint (.safetensors) in models/checkpoints or "
    "models/priorface/authface, or a diffusers SDXL folder (model_index.json) in models/diffusers"
)
CONTROLNET_EXPECTED = (
    "the AuthFace stage II ControlNet: a diffusers-format .safetensors file or a diffusers folder (config.json) "
    "in models/controlnet or models/priorface/authface"
)


def _choices(keys: tuple[str, ...], placeholder: str) -> list[str]:
    names: list[str] = []
    for key in keys:
        for name in comfy_bridge.LOCATOR.list(key):
            is_file = Path(name).suffix.lower() in MODEL_KINDS[key].extensions
            if name not in names and (not is_file or name.lower().endswith(_SINGLE_FILES)):
                names.append(name)
    return names or [placeholder]


def sdxl_choices() -> list[str]:
    """Stage I candidates: safetensors files and model folders of the SDXL keys."""
    return _choices(SDXL_KEYS, "(no SDXL file in models/checkpoints or models/priorface/authface)")


def controlnet_choices() -> list[str]:
    """Stage II candidates: safetensors files and model folders of the ControlNet keys."""
    return _choices(CONTROLNET_KEYS, "(no ControlNet file in models/controlnet or models/priorface/authface)")


def resolve_any(keys: tuple[str, ...], name: str, expected: str) -> Path:
    """Path of ``name`` in the first folder of ``keys`` that has it, else an error listing every folder."""
    searched: list[Path] = []
    for key in keys:
        try:
            return comfy_bridge.LOCATOR.resolve(key, name)
        except ModelFileNotFoundError as e:
            searched += [p for p in e.searched if p not in searched]
    where = "\n".join(f"  - {p}{'' if p.is_dir() else '  (does not exist)'}" for p in searched) or "  (none)"
    raise FileNotFoundError(f"{name!r} not found.\nSearched:\n{where}\nExpected {expected}.")


class AuthFaceLoaderNode:
    """Loads the AuthFace stage I SDXL and its stage II ControlNet."""

    NODE_ID = "PriorFaceAuthFaceLoader"
    DISPLAY_NAME = "PriorFace AuthFace Loader"
    CATEGORY = _CATEGORY
    DESCRIPTION = (
        "Loads AuthFace: the face fine-tuned SDXL (stage I; a single-file checkpoint or a diffusers folder) and "
        "the ControlNet trained on degraded faces (stage II; a diffusers-format .safetensors or folder). The "
        "tokenizers come from the diffusers folder or from ComfyUI's own CLIP tokenizer."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("authface",)
    OUTPUT_TOOLTIPS = ("SDXL UNet, VAE, text encoders and ControlNet, for the AuthFace restore nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        sdxl, controlnet = sdxl_choices(), controlnet_choices()
        return {
            "required": {
                "model_name": (
                    sdxl,
                    {
                        "default": sdxl[0],
                        "tooltip": "Stage I SDXL: models/checkpoints, priorface/authface, diffusers.",
                    },
                ),
                "weights": (
                    controlnet,
                    {
                        "default": controlnet[0],
                        "tooltip": "Stage II ControlNet: models/controlnet or priorface/authface.",
                    },
                ),
                "precision": (
                    list(PRECISIONS),
                    {
                        "default": "auto",
                        "tooltip": "auto: bf16/fp16 on a GPU, fp32 on CPU (half is ignored on CPU).",
                    },
                ),
            }
        }

    def load(self, model_name: str, weights: str, precision: str):
        from ..inference.authface_loading import load_authface

        sdxl = resolve_any(SDXL_KEYS, model_name, SDXL_EXPECTED)
        controlnet = resolve_any(CONTROLNET_KEYS, weights, CONTROLNET_EXPECTED)
        device = comfy_bridge.torch_device()
        return (
            load_authface(
                sdxl, controlnet, device, precision, tokenizer_dirs=comfy_bridge.comfy_tokenizer_dirs()
            ),
        )


def _sampler_inputs() -> dict:
    return {
        "steps": ("INT", {"default": 30, "min": 1, "max": 200, "step": 1, "tooltip": "Denoising steps."}),
        "scheduler": (
            list(SCHEDULERS),
            {"default": "ddim", "tooltip": "Sampler: DDIM (eta 0), DDPM or Euler."},
        ),
        "guidance": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 20.0,
                "step": 0.1,
                "tooltip": "CFG scale; <= 1 uses the prompt alone.",
            },
        ),
        "control_strength": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 2.0,
                "step": 0.05,
                "tooltip": "ControlNet residual scale (fidelity).",
            },
        ),
        "seed": (
            "INT",
            {"default": 0, "min": 0, "max": 2**48, "tooltip": "Noise seed; face i uses seed + i."},
        ),
        "start": (
            list(START_MODES),
            {"default": "noise", "tooltip": "noise: pure noise; input: the degraded face's latent, noised."},
        ),
        "denoise": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.01,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "start=input: share of steps run.",
            },
        ),
        "color_correction": (
            list(COLOR_CORRECTIONS),
            {"default": "wavelet", "tooltip": "Keep the degraded face's colours (low frequencies)."},
        ),
        "vae_tile": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 4096,
                "step": 64,
                "tooltip": "VAE tile in pixels; 0 = whole image.",
            },
        ),
    }


_PROMPTS = {
    "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Empty: AuthFace's null prompt."}),
    "negative_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Used when guidance > 1."}),
}


def _settings(color_correction: str, **values) -> AuthFaceSettings:
    return AuthFaceSettings(color_fix=color_correction, **values)


class AuthFaceRestoreFacesNode:
    """Restores aligned face crops with AuthFace."""

    NODE_ID = "PriorFaceAuthFaceRestoreFaces"
    DISPLAY_NAME = "PriorFace AuthFace Restore Faces"
    CATEGORY = _CATEGORY
    DESCRIPTION = (
        "Runs AuthFace on aligned faces (FFHQ framing, e.g. from Detect & Crop Faces): each face is resized to "
        "size x size, sampled by the SDXL UNet guided by the ControlNet, and colour-fixed against its input."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("faces",)
    OUTPUT_TOOLTIPS = ("Restored faces at size x size (or the input size when size is 0).",)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "authface": (MODEL_TYPE, {"tooltip": "From AuthFace Loader."}),
                "faces": ("IMAGE", {"tooltip": "Aligned degraded faces."}),
                "size": (
                    "INT",
                    {
                        "default": DEFAULT_SIZE,
                        "min": 0,
                        "max": 2048,
                        "step": 64,
                        "tooltip": "Working size; 0 = input.",
                    },
                ),
                **_sampler_inputs(),
            },
            "optional": dict(_PROMPTS),
        }

    def restore(self, authface, faces, size, color_correction, prompt="", negative_prompt="", **values):
        settings = _settings(color_correction, prompt=prompt, negative_prompt=negative_prompt, **values)
        out = restore_faces(authface, image_to_bchw(faces, "faces"), settings, size=size or None)
        return (bchw_to_image(out),)


class AuthFaceRestorePhotoNode:
    """Detects every face in photos, restores it with AuthFace and pastes it back."""

    NODE_ID = "PriorFaceAuthFaceRestorePhoto"
    DISPLAY_NAME = "PriorFace AuthFace Restore Photo"
    CATEGORY = _CATEGORY
    DESCRIPTION = (
        "Whole-photo restoration: detect -> align (FFHQ framing) at size x size -> AuthFace -> paste back into "
        "the photo upscaled by 'upscale'. One SDXL run per face: about a minute per face at 1024 px on a GPU."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The restored photos.", "One line per face.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "authface": (MODEL_TYPE, {"tooltip": "From AuthFace Loader."}),
                "image": ("IMAGE", {"tooltip": "Photos with faces."}),
                "detector": (detector_choices(), {"default": EMBEDDED_DETECTOR, "tooltip": "Face detector."}),
                "size": (
                    "INT",
                    {
                        "default": DEFAULT_SIZE,
                        "min": 64,
                        "max": 2048,
                        "step": 64,
                        "tooltip": "Face crop size.",
                    },
                ),
                "upscale": upscale_input(),
                **_sampler_inputs(),
            },
            "optional": dict(_PROMPTS),
        }

    def restore(
        self,
        authface,
        image,
        detector,
        size,
        upscale,
        color_correction,
        prompt="",
        negative_prompt="",
        **values,
    ):
        backend, path = resolve_detector(detector)
        settings = _settings(color_correction, prompt=prompt, negative_prompt=negative_prompt, **values)
        out, _data, report = restore_photo(
            authface,
            image_to_bchw(image),
            settings,
            size=size,
            upscale=upscale,
            backend=backend,
            model_path=path,
        )
        return (bchw_to_image(out), "\n".join(report) or "no face found")


NODES = [AuthFaceLoaderNode, AuthFaceRestoreFacesNode, AuthFaceRestorePhotoNode]
