"""VSPBFR nodes: load the three released files, restore aligned faces or whole photos, preview the
W+ trajectory of the code diffuser, and convert the official .pt files to safetensors."""

from __future__ import annotations

from pathlib import Path

from ..inference.color_correction import COLOR_CORRECTIONS
from ..inference.images import bchw_to_image, image_to_bchw
from ..inference.vspbfr_loading import (
    DOWNLOAD_FROM,
    FILES,
    FOLDER_KEY,
    file_choices,
    load_vspbfr_models,
    resolve_vspbfr_files,
)
from ..inference.vspbfr_pipeline import restore_faces, restore_photo
from . import comfy_bridge
from .face_nodes import EMBEDDED_DETECTOR, detector_choices, resolve_detector
from .node_inputs import strength_input, upscale_input

MODEL_TYPE = "PRIORFACE_VSPBFR"
CATEGORY = "PriorFace/VSPBFR"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _file_input(slot: str):
    choices = file_choices(comfy_bridge.LOCATOR, slot)
    official, what = FILES[slot]
    default = official if official in choices else choices[0]
    return (choices, {"default": default, "tooltip": f"{what}; officially {official} from {DOWNLOAD_FROM}."})


def _sampling_inputs() -> dict:
    return {
        "seed": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": MAX_SEED,
                "tooltip": "Drives every random draw (diffusion start, StyleGAN noise, z, style mixing).",
            },
        ),
        "steps": (
            "INT",
            {
                "default": 4,
                "min": 1,
                "max": 4,
                "tooltip": "Code-diffuser steps; the released diffuser was trained with 4 (the official setting).",
            },
        ),
    }


def _model_and_faces() -> dict:
    return {
        "vspbfr": (MODEL_TYPE, {"tooltip": "From VSPBFR Loader."}),
        "faces": (
            "IMAGE",
            {
                "tooltip": "Aligned square faces (FFHQ framing, e.g. from Detect & Crop Faces); resized to 512."
            },
        ),
    }


class VSPBFRLoaderNode:
    """Loads the style codec, code diffuser and restoration network from models/priorface/vspbfr."""

    NODE_ID = "PriorFaceVSPBFRLoader"
    DISPLAY_NAME = "PriorFace VSPBFR Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads VSPBFR (visual style prompts for blind face restoration): the three files released on Hugging "
        f"Face ({DOWNLOAD_FROM}) or their safetensors conversions, from models/priorface/vspbfr. fp16 on CUDA."
    )
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("vspbfr",)
    OUTPUT_TOOLTIPS = ("The three networks, ready for the VSPBFR restore nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {slot: _file_input(slot) for slot in FILES}}

    def load(self, style_codec: str, code_diffuser: str, restoration_net: str):
        paths = resolve_vspbfr_files(
            comfy_bridge.LOCATOR,
            style_codec=style_codec,
            code_diffuser=code_diffuser,
            restoration_net=restoration_net,
        )
        return (load_vspbfr_models(**paths, device=comfy_bridge.torch_device()),)


class VSPBFRRestoreFacesNode:
    """Restores aligned face crops with VSPBFR."""

    NODE_ID = "PriorFaceVSPBFRRestoreFaces"
    DISPLAY_NAME = "PriorFace VSPBFR Restore Faces"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Blind restoration of aligned faces: style encoder -> code diffuser (visual style prompt) -> StyleGAN2 "
        "feature bank -> restoration network. The same seed gives the same faces."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("faces",)
    OUTPUT_TOOLTIPS = ("Restored faces at 512x512.",)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_model_and_faces(), **_sampling_inputs()}}

    def restore(self, vspbfr, faces, seed, steps):
        return (bchw_to_image(restore_faces(vspbfr, image_to_bchw(faces), seed, steps).faces),)


class VSPBFRTrajectoryNode:
    """Decodes every code of the diffusion with the StyleGAN2 generator (the paper's Fig. 2)."""

    NODE_ID = "PriorFaceVSPBFRTrajectory"
    DISPLAY_NAME = "PriorFace VSPBFR W+ Trajectory"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Shows how the code diffuser turns noise into the visual style prompt: each intermediate W+ code "
        "decoded by StyleGAN2 with the same noise, from the start noise to the final prompt."
    )
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("trajectory", "faces")
    OUTPUT_TOOLTIPS = (
        "steps + 1 images per face (start code first, final prompt last), faces one after another.",
        "The restored faces of the same run.",
    )
    FUNCTION = "trajectory"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_model_and_faces(), **_sampling_inputs()}}

    def trajectory(self, vspbfr, faces, seed, steps):
        result = restore_faces(vspbfr, image_to_bchw(faces), seed, steps, return_trajectory=True)
        frames = result.trajectory.flatten(0, 1)
        return (bchw_to_image(frames), bchw_to_image(result.faces))


class VSPBFRRestorePhotoNode:
    """Detects every face in photos, restores it with VSPBFR and pastes it back."""

    NODE_ID = "PriorFaceVSPBFRRestorePhoto"
    DISPLAY_NAME = "PriorFace VSPBFR Restore Photo"
    CATEGORY = CATEGORY
    DESCRIPTION = "Whole-photo restoration: detect -> align (FFHQ, 512 px) -> VSPBFR -> paste back."
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The restored photos.", "One line per face.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vspbfr": (MODEL_TYPE, {"tooltip": "From VSPBFR Loader."}),
                "image": ("IMAGE", {"tooltip": "Photos with faces."}),
                "detector": (detector_choices(), {"default": EMBEDDED_DETECTOR, "tooltip": "Face detector."}),
                **_sampling_inputs(),
                "upscale": upscale_input(),
                "strength": strength_input(),
                "color_correction": (
                    list(COLOR_CORRECTIONS),
                    {"default": "wavelet", "tooltip": "Keep the original colours of each face."},
                ),
            }
        }

    def restore(self, vspbfr, image, detector, seed, steps, upscale, strength, color_correction):
        backend, path = resolve_detector(detector)
        out, _data, report = restore_photo(
            vspbfr,
            image_to_bchw(image),
            seed,
            steps,
            upscale=upscale,
            strength=strength,
            backend=backend,
            model_path=path,
            color_correction=color_correction,
        )
        return (bchw_to_image(out), "\n".join(report) or "no face found")


class VSPBFRConvertNode:
    """Converts an official VSPBFR .pt file to a PriorFace safetensors file beside it."""

    NODE_ID = "PriorFaceVSPBFRConvert"
    DISPLAY_NAME = "PriorFace VSPBFR Convert to safetensors"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Writes <name>.safetensors next to an official VSPBFR .pt (any of the three): only the weights used "
        "at test time, no optimizer states, loadable without pickle. The loader accepts either."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("What was written where.",)
    FUNCTION = "convert"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        pt = [n for n in comfy_bridge.LOCATOR.list(FOLDER_KEY) if n.lower().endswith((".pt", ".pth"))]
        choices = pt or [name for name, _ in FILES.values()]
        return {
            "required": {
                "checkpoint": (choices, {"default": choices[0], "tooltip": "Official .pt file to convert."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing .safetensors."}),
            }
        }

    def convert(self, checkpoint: str, overwrite: bool):
        from ..models.vspbfr_checkpoints import convert_official_to_safetensors

        src = comfy_bridge.LOCATOR.resolve(FOLDER_KEY, checkpoint)
        dst = Path(src).with_suffix(".safetensors")
        if dst.exists() and not overwrite:
            text = f"{dst} exists already; set overwrite to replace it"
        else:
            text = f"wrote {convert_official_to_safetensors(src, dst)}"
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = [
    VSPBFRLoaderNode,
    VSPBFRRestoreFacesNode,
    VSPBFRRestorePhotoNode,
    VSPBFRTrajectoryNode,
    VSPBFRConvertNode,
]
