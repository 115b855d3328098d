"""XPSR nodes: load base SD1.5 + an XPSR checkpoint, build the two prompts, x4 super-resolve images,
and restore every face of whole photos through the face pipeline."""

from __future__ import annotations

from ..inference.color_correction import COLOR_CORRECTIONS
from ..inference.device import PRECISIONS
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.xpsr_loading import (
    base_choices,
    load_xpsr_pipeline,
    resolve_base,
    resolve_xpsr,
    xpsr_choices,
)
from ..inference.xpsr_prompts import (
    ADDED_PROMPT,
    LOWLEVEL_NEGATIVE_PROMPT,
    NEGATIVE_PROMPT,
    prompts_from_texts,
)
from ..inference.xpsr_sampler import PRESETS, START_MODES, SamplerSettings, preset_settings
from . import comfy_bridge
from .face_nodes import EMBEDDED_DETECTOR, detector_choices, resolve_detector

MODEL_TYPE = "PRIORFACE_XPSR"
PROMPTS_TYPE = "PRIORFACE_XPSR_PROMPTS"
CATEGORY = "PriorFace/XPSR"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
_CUSTOM = "custom"


def _combo(options, default, tip: str) -> tuple:
    return (list(options), {"default": default, "tooltip": tip})


def _number(kind: str, default, low, high, tip: str, step=None) -> tuple:
    opts = {"default": default, "min": low, "max": high, "tooltip": tip}
    return (kind, opts if step is None else {**opts, "step": step})


def _sampler_inputs() -> dict:
    return {
        "preset": _combo(
            [*PRESETS, _CUSTOM],
            "official",
            "official: 20 DDPM steps, CFG 4.5 (the repository's test config); paper: 50 steps, CFG 5.5; "
            "custom: the steps and guidance below.",
        ),
        "steps": _number("INT", 20, 1, 1000, "DDPM steps (preset 'custom' only)."),
        "guidance": _number(
            "FLOAT", 4.5, 1.0, 20.0, "Guidance (preset 'custom' only); 1 = positive prompts only.", 0.1
        ),
        "seed": _number("INT", 0, 0, MAX_SEED, "Image i of the batch uses seed + i."),
        "start": _combo(
            START_MODES,
            "lr",
            "lr: from the noised latent of the upscaled input (official); noise: pure noise.",
        ),
        "color_fix": _combo(
            COLOR_CORRECTIONS,
            "adain",
            "Match colours to the upscaled input: adain (official), wavelet, none.",
        ),
    }


def _settings(preset, steps, guidance, seed, start, color_fix, **changes) -> SamplerSettings:
    changes.update(seed=int(seed), start=start, color_fix=color_fix)
    if preset == _CUSTOM:
        return SamplerSettings(steps=int(steps), guidance=float(guidance), **changes)
    return preset_settings(preset, **changes)


class XPSRLoaderNode:
    """Loads base SD1.5 (VAE, CLIP text encoder, scheduler) and an XPSR checkpoint (UNet, ControlNet)."""

    NODE_ID = "PriorFaceXPSRLoader"
    DISPLAY_NAME = "PriorFace XPSR Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads XPSR (Qu et al., ECCV 2024): the official checkpoint-<step> folder (unet/ and controlnet/) from "
        "models/priorface/xpsr, on the SD1.5 base it was trained on (single file in models/checkpoints or a "
        "diffusers folder in models/diffusers) for the VAE and text encoder. fp16/bf16 and xformers on CUDA only."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("xpsr",)
    OUTPUT_TOOLTIPS = ("XPSR UNet + ControlNet with the SD1.5 VAE and text encoder.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        bases, folders = base_choices(comfy_bridge.LOCATOR), xpsr_choices(comfy_bridge.LOCATOR)
        return {
            "required": {
                "model_name": _combo(
                    bases, bases[0], "Base SD1.5: v1-5-pruned-emaonly or a diffusers folder."
                ),
                "weights": _combo(
                    folders, folders[0], "XPSR checkpoint folder holding unet/ and controlnet/."
                ),
                "precision": _combo(
                    PRECISIONS, "auto", "auto: bf16/fp16 on a GPU, fp32 on CPU (half is CUDA-only)."
                ),
            }
        }

    def load(self, model_name: str, weights: str, precision: str):
        base = resolve_base(comfy_bridge.LOCATOR, model_name)
        root = resolve_xpsr(comfy_bridge.LOCATOR, weights)
        # A single file carries no tokenizer: use ComfyUI's own CLIP-L one (a diffusers folder has its own).
        tokenizer = None if base.is_dir() else comfy_bridge.comfy_tokenizer_dirs()
        return (load_xpsr_pipeline(base, root, comfy_bridge.torch_device(), precision, tokenizer),)


class XPSRPromptsNode:
    """Builds XPSR's high-level (content) and low-level (quality) prompts from priors or typed text."""

    NODE_ID = "PriorFaceXPSRPrompts"
    DISPLAY_NAME = "PriorFace XPSR Prompts"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "XPSR conditions on two texts per image: a content caption (high-level; 'xpsr_high' preset of Describe) "
        "and a quality description (low-level; 'xpsr_low'). Typed text, when not empty, replaces the priors' text. "
        "The added, negative and low-level negative prompts default to the official ones."
    )
    RETURN_TYPES = (PROMPTS_TYPE, "STRING")
    RETURN_NAMES = ("prompts", "summary")
    OUTPUT_TOOLTIPS = (
        "The texts for XPSR Upscale / Restore Faces.",
        "The final prompts, one block per image.",
    )
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        def text(default, tip):
            return ("STRING", {"default": default, "multiline": True, "tooltip": tip})

        return {
            "required": {
                "high_level": text(
                    "", "Content description; overrides the priors' prompt_high when not empty."
                ),
                "low_level": text(
                    "", "Quality description; overrides the priors' prompt_low when not empty."
                ),
                "added_prompt": text(ADDED_PROMPT, "Appended to every high-level prompt (official text)."),
                "negative_prompt": text(
                    NEGATIVE_PROMPT, "Negative of the high-level prompt under guidance (official)."
                ),
                "lowlevel_negative_prompt": text(
                    LOWLEVEL_NEGATIVE_PROMPT,
                    "Negative of the low-level prompt (hard-coded in the official pipeline).",
                ),
            },
            "optional": {
                "priors": (
                    "PRIORFACE_PRIORS",
                    {"tooltip": "Priors with prompt_high / prompt_low (Describe)."},
                )
            },
        }

    def build(
        self, high_level, low_level, added_prompt, negative_prompt, lowlevel_negative_prompt, priors=None
    ):
        high = priors.prompt_high if priors is not None else None
        low = priors.prompt_low if priors is not None else None
        prompts = prompts_from_texts(
            high, low, high_level, low_level, added_prompt, negative_prompt, lowlevel_negative_prompt
        )
        lines = []
        for i in range(prompts.count):
            h, lo = prompts.for_image(i, prompts.count)
            lines.append(f"[{i}] high: {h}\n[{i}] low: {lo}")
        return (prompts, "\n".join(lines))


class XPSRUpscaleNode:
    """Super-resolves images x4 (or another factor) with XPSR."""

    NODE_ID = "PriorFaceXPSRUpscale"
    DISPLAY_NAME = "PriorFace XPSR Upscale"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "XPSR diffusion super-resolution: bicubic x4, DDPM sampling guided by the high- and low-level prompts, "
        "colour fix. Outputs under 512 px are sampled at 512 and resized back (official); large images are "
        "denoised and VAE-coded in overlapping tiles."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The super-resolved images.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xpsr": (MODEL_TYPE, {"tooltip": "From XPSR Loader."}),
                "image": ("IMAGE", {"tooltip": "Low-resolution images."}),
                "prompts": (PROMPTS_TYPE, {"tooltip": "From XPSR Prompts: one per image or one for all."}),
                **_sampler_inputs(),
                "upscale": _number(
                    "FLOAT", 4.0, 1.0, 8.0, "Output size / input size (XPSR is trained for 4).", 0.5
                ),
                "tile_size": _number(
                    "INT",
                    768,
                    0,
                    4096,
                    "Denoise outputs larger than this (px) in overlapping tiles (0 = never); "
                    "lower it when the GPU runs out of memory.",
                    64,
                ),
            }
        }

    def upscale(
        self, xpsr, image, prompts, preset, steps, guidance, seed, start, color_fix, upscale, tile_size
    ):
        from ..inference.xpsr_sampler import xpsr_upscale

        settings = _settings(
            preset,
            steps,
            guidance,
            seed,
            start,
            color_fix,
            upscale=float(upscale),
            latent_tile=int(tile_size) // 8,
        )
        return (bchw_to_image(xpsr_upscale(xpsr, image_to_bchw(image), prompts, settings)),)


class XPSRRestoreFacesNode:
    """Detects every face in photos, super-resolves it x4 with XPSR and pastes it back."""

    NODE_ID = "PriorFaceXPSRRestoreFaces"
    DISPLAY_NAME = "PriorFace XPSR Restore Faces"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Whole-photo face restoration: detect -> align (FFHQ) -> crop at face_size / 4 -> XPSR x4 -> paste back. "
        "Prompts: one for all faces, or one per face in detection order (describe the crops of Detect & Crop "
        "Faces run with the same detector)."
    )
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The restored photos.", "One line per face.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xpsr": (MODEL_TYPE, {"tooltip": "From XPSR Loader."}),
                "image": ("IMAGE", {"tooltip": "Photos with faces."}),
                "prompts": (
                    PROMPTS_TYPE,
                    {"tooltip": "From XPSR Prompts: one for all faces or one per face."},
                ),
                "detector": (detector_choices(), {"default": EMBEDDED_DETECTOR, "tooltip": "Face detector."}),
                "face_size": _number(
                    "INT", 512, 128, 1024, "Restored face size; crops are a quarter of it.", 64
                ),
                "photo_upscale": _number(
                    "FLOAT", 1.0, 1.0, 8.0, "Upscale the whole photo (background bicubic).", 0.5
                ),
                "strength": _number(
                    "FLOAT", 1.0, 0.0, 1.0, "Blend of restored (1) and original (0) faces.", 0.05
                ),
                "paste_color_correction": _combo(
                    COLOR_CORRECTIONS, "wavelet", "Colour match of each pasted face to the photo."
                ),
                **_sampler_inputs(),
            }
        }

    def restore(
        self,
        xpsr,
        image,
        prompts,
        detector,
        face_size,
        photo_upscale,
        strength,
        paste_color_correction,
        **sampler,
    ):
        from ..inference.xpsr_faces import restore_faces_xpsr

        backend, path = resolve_detector(detector)
        out, _data, report = restore_faces_xpsr(
            xpsr,
            image_to_bchw(image),
            prompts,
            _settings(**sampler),
            face_size=int(face_size),
            photo_upscale=float(photo_upscale),
            strength=float(strength),
            backend=backend,
            model_path=path,
            color_correction=paste_color_correction,
            detect_options={"device": comfy_bridge.torch_device()},
        )
        return (bchw_to_image(out), "\n".join(report) or "no face found")


NODES = [XPSRLoaderNode, XPSRPromptsNode, XPSRUpscaleNode, XPSRRestoreFacesNode]
