"""Training nodes of the diffusion methods: XPSR (SD1.5 ControlNet) and AuthFace stages I and II (SDXL)."""

from __future__ import annotations

from pathlib import Path

from ..training.loop import TrainConfig
from . import comfy_bridge
from .training_nodes import (
    TrainingNodeBase,
    _existing_folder,
    _file_input,
    _float_input,
    _folder_input,
    _grad_accum_input,
    _optional_file,
    _optional_folder,
    job_defaults,
    job_loop_settings,
    job_task_settings,
    shipped_job,
)


class XPSRTrainNode(TrainingNodeBase):
    """Trains the XPSR ControlNet + pixel attention on HQ faces over a frozen SD1.5."""

    NODE_ID = "PriorFaceTrainXPSR"
    DISPLAY_NAME = "PriorFace Train XPSR"
    DESCRIPTION = (
        "Trains XPSR's ControlNet (Semantic-Fusion Attention) and the UNet's conditional attention on a frozen "
        "SD1.5: noise MSE + 0.05 x Degradation-Free Constraint, AdamW 5e-5 / wd 1e-2 (official settings), "
        "Real-ESRGAN degradations on the fly. High/low prompts come from folders of <name>.txt files (e.g. "
        "written by the prior extraction batch) or one fixed text. Needs a GPU in practice; the result (unet/ + "
        "controlnet/) appears in the XPSR Loader's list."
    )
    TASK = "xpsr"
    MODEL_KEY = "priorface_xpsr"
    EXPORT_SUFFIX = ""  # a checkpoint folder
    LOOP_INPUTS = ("grad_accum",)
    DEFAULTS = {"steps": 20000, "batch_size": 2, "lr": 5e-5}

    @classmethod
    def task_inputs(cls) -> dict:
        from ..inference.xpsr_loading import base_choices
        from ..models.xpsr_attention import SFA_MODES

        bases = base_choices(comfy_bridge.LOCATOR)
        return {
            "model_name": (bases, {"default": bases[0], "tooltip": "SD1.5 single file or diffusers folder."}),
            "train_folder": _folder_input("Folder of aligned HQ face images."),
            "val_folder": _folder_input("Optional held-out faces for sample grids and PSNR."),
            "size": (
                "INT",
                {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip": "HR side in pixels."},
            ),
            "high_prompts_folder": _folder_input(
                "Folder of <name>.txt high-level prompts (empty: use the text below)."
            ),
            "low_prompts_folder": _folder_input(
                "Folder of <name>.txt low-level prompts (empty: use the text below)."
            ),
            "high_prompt": (
                "STRING",
                {"default": "a photo of a face", "tooltip": "Fixed high-level prompt."},
            ),
            "low_prompt": ("STRING", {"default": "", "tooltip": "Fixed low-level prompt."}),
            "sfa_mode": (
                list(SFA_MODES),
                {"default": "parallel", "tooltip": "Semantic-Fusion Attention variant."},
            ),
            "dfc_mode": (
                ["official", "paper"],
                {"default": "official", "tooltip": "DFC heads: 3 + 13 or 3 + 3."},
            ),
            "grad_accum": (
                "INT",
                {"default": 16, "min": 1, "max": 256, "tooltip": "Batches per optimizer step."},
            ),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Less memory, slower."}),
        }

    def train_config(self, out_dir: Path, **loop_args) -> TrainConfig:
        return TrainConfig(
            out_dir=str(out_dir),
            optimizer="adamw",
            weight_decay=1e-2,
            betas=(0.9, 0.999),
            grad_clip=1.0,
            precision="fp16",
            val_every=1000,
            ckpt_every=500,
            **loop_args,
        )

    def build_task(
        self,
        model_name,
        train_folder,
        val_folder,
        size,
        high_prompts_folder,
        low_prompts_folder,
        high_prompt,
        low_prompt,
        sfa_mode,
        dfc_mode,
        gradient_checkpointing,
    ):
        from ..inference.xpsr_loading import resolve_base
        from ..training.xpsr_task import XPSRTask, XPSRTaskConfig

        base = resolve_base(comfy_bridge.LOCATOR, model_name)
        self._sources = [base]
        tokenizers = comfy_bridge.comfy_tokenizer_dirs()
        return XPSRTask(
            XPSRTaskConfig(
                base_model=str(base),
                train_dirs=[str(_existing_folder(train_folder, "train_folder"))],
                val_dirs=[str(_existing_folder(val_folder, "val_folder"))] if val_folder.strip() else [],
                tokenizer_dirs=[str(tokenizers)] if tokenizers and not base.is_dir() else [],
                size=size,
                high_prompts=str(_existing_folder(high_prompts_folder, "high_prompts_folder"))
                if high_prompts_folder.strip()
                else None,
                low_prompts=str(_existing_folder(low_prompts_folder, "low_prompts_folder"))
                if low_prompts_folder.strip()
                else None,
                high_prompt=high_prompt,
                low_prompt=low_prompt,
                sfa_mode=sfa_mode,
                dfc_mode=dfc_mode,
                gradient_checkpointing=gradient_checkpointing,
                export_dtype="fp16",
            )
        )


_SDXL_BASE_KEYS = ("checkpoints", "diffusers")
_AUTHFACE_STAGE1 = "authface/stage1"
_AUTHFACE_STAGE2 = "authface/stage2"


def _sdxl_source(keys: tuple[str, ...], name: str, expected: str) -> tuple[Path, list[str]]:
    """(path of an SDXL choice, tokenizer folders): ComfyUI's CLIP tokenizer for a single file."""
    from .authface_nodes import resolve_any

    path = resolve_any(keys, name, expected)
    tokenizers = comfy_bridge.comfy_tokenizer_dirs()
    return path, ([str(tokenizers)] if tokenizers and not path.is_dir() else [])


class AuthFaceStage1TrainNode(TrainingNodeBase):
    """AuthFace stage I: fine-tunes the whole SDXL UNet on high-quality face photos."""

    NODE_ID = "PriorFaceTrainAuthFaceStage1"
    DISPLAY_NAME = "PriorFace Train AuthFace Stage I (SDXL)"
    DESCRIPTION = (
        "AuthFace stage I: fine-tunes the whole SDXL UNet (VAE and both text encoders frozen) on high-quality "
        "face photos with captions, SDXL's epsilon loss with micro-conditioning; AdamW lr 5e-7 and the other "
        "settings of configs/authface/stage1.json. Validation draws text-to-image samples of the prompts below. "
        "The result is one SDXL single-file checkpoint published to models/checkpoints, so CheckpointLoaderSimple "
        "and the AuthFace Loader list it. Needs a large GPU (about 40 GB at 1024 px with gradient checkpointing)."
    )
    TASK = "authface_stage1"
    JOB = _AUTHFACE_STAGE1
    MODEL_KEY = "checkpoints"
    LOOP_INPUTS = ("grad_accum",)
    DEFAULTS = job_defaults(_AUTHFACE_STAGE1)
    # Task settings taken from the job file as they are (no widget).
    JOB_TASK_KEYS = (
        "hflip",
        "caption_dropout",
        "val_items",
        "validation_seeds",
        "validation_steps",
        "guidance_scale",
        "negative_prompt",
        "export_dtype",
    )

    @classmethod
    def task_inputs(cls) -> dict:
        from ..training.authface_data import CAPTION_SOURCES
        from .authface_nodes import _choices  # the loader's listing rule, limited to base folders

        job = shipped_job(cls.JOB)["task_config"]
        bases = _choices(_SDXL_BASE_KEYS, "(no SDXL file in models/checkpoints or models/diffusers)")
        return {
            "model_name": (
                bases,
                {
                    "default": bases[0],
                    "tooltip": "Base SDXL: a single file in checkpoints or a diffusers folder.",
                },
            ),
            "train_folder": _folder_input("Folder of high-quality face photos (png/jpg)."),
            "val_folder": _folder_input(
                "Optional held-out faces: fixed-noise denoising loss per validation."
            ),
            "caption_source": (
                [c for c in CAPTION_SOURCES if c != "none"],
                {
                    "default": "txt",
                    "tooltip": "txt: <image>.txt beside each image; json/authface_tags: captions_file "
                    "{name: caption}; template: UTKFace labels or 'a photo of a face'.",
                },
            ),
            "captions_file": _file_input("JSON {relative image name: caption} for json / authface_tags."),
            "caption_fallback": (
                "STRING",
                {
                    "default": "",
                    "tooltip": "Caption of images without one (empty: a missing caption is an error).",
                },
            ),
            "resolution": (
                "INT",
                {
                    "default": int(job["resolution"]),
                    "min": 64,
                    "max": 2048,
                    "step": 64,
                    "tooltip": "Training side in pixels (paper: 1024).",
                },
            ),
            "validation_prompts": (
                "STRING",
                {
                    "default": "\n".join(job["validation_prompts"]),
                    "multiline": True,
                    "tooltip": "One prompt per line; each gives a row of samples (empty: no samples).",
                },
            ),
            "grad_accum": _grad_accum_input(job_loop_settings(cls.JOB).get("grad_accum", 1)),
            "gradient_checkpointing": (
                "BOOLEAN",
                {"default": bool(job["gradient_checkpointing"]), "tooltip": "Less memory, slower."},
            ),
        }

    def build_task(
        self,
        model_name,
        train_folder,
        val_folder,
        caption_source,
        captions_file,
        caption_fallback,
        resolution,
        validation_prompts,
        gradient_checkpointing,
    ):
        from ..training.authface_stage1 import AuthFaceStage1Config, AuthFaceStage1Task
        from .authface_nodes import SDXL_EXPECTED

        base, tokenizers = _sdxl_source(_SDXL_BASE_KEYS, model_name, SDXL_EXPECTED)
        self._sources = [base]
        needs_file = caption_source in ("json", "authface_tags")
        return AuthFaceStage1Task(
            AuthFaceStage1Config(
                **job_task_settings(self.JOB, self.JOB_TASK_KEYS),
                base_model=str(base),
                train_dirs=[str(_existing_folder(train_folder, "train_folder"))],
                val_dirs=_optional_folder(val_folder, "val_folder"),
                tokenizer_dirs=tokenizers or None,
                resolution=resolution,
                captions=caption_source,
                captions_file=_optional_file(captions_file, "captions_file") if needs_file else None,
                caption_fallback=caption_fallback.strip() or None,
                validation_prompts=[line.strip() for line in validation_prompts.splitlines() if line.strip()],
                gradient_checkpointing=gradient_checkpointing,
            )
        )


class AuthFaceStage2TrainNode(TrainingNodeBase):
    """AuthFace stage II: trains the restoration ControlNet on the frozen stage-I SDXL."""

    NODE_ID = "PriorFaceTrainAuthFaceStage2"
    DISPLAY_NAME = "PriorFace Train AuthFace Stage II (ControlNet)"
    DESCRIPTION = (
        "AuthFace stage II: a ControlNet copied from the stage-I UNet learns to restore degraded faces "
        "(degraded on the fly) with L_noise + the time-aware facial loss (eye/mouth discriminators and Gram "
        "style terms weighted by a logit-normal w(t) with m, s); settings of configs/authface/stage2.json. "
        "The ControlNet (one diffusers-layout .safetensors) is published to models/controlnet, where "
        "ComfyUI's Load ControlNet Model and the AuthFace Loader list it. Needs a large GPU."
    )
    TASK = "authface_stage2"
    JOB = _AUTHFACE_STAGE2
    MODEL_KEY = "controlnet"
    LOOP_INPUTS = ("grad_accum",)
    DEFAULTS = job_defaults(_AUTHFACE_STAGE2)
    JOB_TASK_KEYS = (
        "degradation_settings",
        "hflip",
        "null_prompt",
        "conditioning_scale",
        "adv_mode",
        "disc_channels",
        "disc_lr",
        "disc_betas",
        "disc_time_weighted",
        "val_items",
        "val_seed",
        "validation_steps",
        "export_dtype",
    )

    @classmethod
    def task_inputs(cls) -> dict:
        from ..inference.degradations.pipeline import MODES
        from ..inference.face_align import TEMPLATES
        from ..models.authface_discriminator import REGION_SETS
        from ..models.authface_facial import WEIGHT_MODES
        from .authface_nodes import sdxl_choices

        job = shipped_job(cls.JOB)["task_config"]
        bases = sdxl_choices()
        return {
            "model_name": (
                bases,
                {"default": bases[0], "tooltip": "The stage-I SDXL (e.g. published by the stage-I node)."},
            ),
            "train_folder": _folder_input("Folder of high-quality aligned faces (FFHQ framing)."),
            "val_folder": _folder_input(
                "Optional held-out faces: restored samples, PSNR/SSIM per validation."
            ),
            "landmarks_json": _file_input(
                "Optional JSON {image name: 5 landmarks} for the eye/mouth boxes (scripts/face_landmarks.py); "
                "empty: the template's points."
            ),
            "landmark_template": (
                sorted(TEMPLATES),
                {"default": job["landmark_template"], "tooltip": "Framing of faces without landmarks."},
            ),
            "degradation": (
                list(MODES),
                {"default": job["degradation"], "tooltip": "How the control image is degraded from HQ."},
            ),
            "resolution": (
                "INT",
                {
                    "default": int(job["resolution"]),
                    "min": 64,
                    "max": 2048,
                    "step": 64,
                    "tooltip": "Training side in pixels (paper: 1024).",
                },
            ),
            "lambda_d": _float_input(job["lambda_d"], "Adversarial weight of the facial loss."),
            "lambda_s": _float_input(
                job["lambda_s"], "Gram-matrix style weight of the facial loss.", step=1.0
            ),
            "weight_mode": (
                list(WEIGHT_MODES),
                {
                    "default": job["weight_mode"],
                    "tooltip": "time_aware: w(t) logit-normal (paper); constant: w = 1; none: no facial loss.",
                },
            ),
            "m": _float_input(job["m"], "Logit-normal location of w(t).", lo=-5.0, hi=5.0),
            "s": _float_input(job["s"], "Logit-normal scale of w(t) (> 0).", lo=0.01, hi=10.0),
            "regions": (
                list(REGION_SETS),
                {"default": job["regions"], "tooltip": "paired: eyes + mouth; separate: each eye + mouth."},
            ),
            "grad_accum": _grad_accum_input(job_loop_settings(cls.JOB).get("grad_accum", 1)),
            "gradient_checkpointing": (
                "BOOLEAN",
                {"default": bool(job["gradient_checkpointing"]), "tooltip": "Less memory, slower."},
            ),
        }

    def build_task(
        self,
        model_name,
        train_folder,
        val_folder,
        landmarks_json,
        landmark_template,
        degradation,
        resolution,
        lambda_d,
        lambda_s,
        weight_mode,
        m,
        s,
        regions,
        gradient_checkpointing,
    ):
        from ..training.authface_stage2 import AuthFaceStage2Config, AuthFaceStage2Task
        from .authface_nodes import SDXL_EXPECTED, SDXL_KEYS

        base, tokenizers = _sdxl_source(SDXL_KEYS, model_name, SDXL_EXPECTED)
        self._sources = [base]
        return AuthFaceStage2Task(
            AuthFaceStage2Config(
                **job_task_settings(self.JOB, self.JOB_TASK_KEYS),
                base_model=str(base),
                tokenizer_dirs=tokenizers or None,
                train_dirs=[str(_existing_folder(train_folder, "train_folder"))],
                val_dirs=_optional_folder(val_folder, "val_folder"),
                landmarks_json=_optional_file(landmarks_json, "landmarks_json"),
                landmark_template=landmark_template,
                degradation=degradation,
                resolution=resolution,
                lambda_d=lambda_d,
                lambda_s=lambda_s,
                weight_mode=weight_mode,
                m=m,
                s=s,
                regions=regions,
                gradient_checkpointing=gradient_checkpointing,
            )
        )


# -- VSPBFR -----------------------------------------------------------------------------------------
NODES = [XPSRTrainNode, AuthFaceStage1TrainNode, AuthFaceStage2TrainNode]
