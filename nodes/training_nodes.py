"""Training nodes: the headless trainers (training/) run inside ComfyUI for artists.

Each node builds the same task the ``priorface train`` command builds, runs the shared loop with
ComfyUI's progress bar and Cancel button (a cancelled run keeps its last step; queueing the node
again resumes it exactly), and publishes the exported weights into the method's model folder so
the method's loader lists them without a restart. The run folder (state, log.csv, curves.png,
samples/) lives in ComfyUI's output directory under ``priorface_training/<method>/<name>``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..inference.images import bchw_to_image, load_image_file
from ..training.loop import TrainConfig, train
from . import comfy_bridge

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_run_name(name: str) -> str:
    """A run name usable as a file name in every OS (letters, digits, . _ -)."""
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"save name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (no folders)")
    return name


def publish(src: Path, dst: Path) -> Path:
    """Copy an exported file or folder to ``dst`` atomically (a partial copy never has the final name)."""
    if not src.exists():
        raise FileNotFoundError(f"training finished but wrote no export at {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
    else:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return dst


def _png_image(path: Path | None) -> torch.Tensor:
    """A PNG as a ComfyUI IMAGE, or a small black placeholder when there is none yet."""
    if path is None or not path.is_file():
        return torch.zeros(1, 64, 64, 3)
    return bchw_to_image(load_image_file(path)[None])


def _latest_png(folder: Path) -> Path | None:
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return pngs[-1] if pngs else None


class TrainingNodeBase:
    """Shared inputs, run folder, progress and publishing of every training node."""

    CATEGORY = "PriorFace/Training"
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("weights_path", "curves", "samples")
    OUTPUT_TOOLTIPS = (
        "Where the trained weights were published (the method's model folder).",
        "Loss and validation curves so far.",
        "The latest validation sample grid.",
    )
    OUTPUT_NODE = True
    FUNCTION = "run"
    TASK = ""  # run-folder and log name
    MODEL_KEY = ""  # model folder the export is published to
    EXPORT_SUFFIX = ".safetensors"  # "" when the export is a folder
    DEFAULTS = {"steps": 1000, "batch_size": 4, "lr": 1e-4}
    LOOP_INPUTS: tuple[str, ...] = ()  # method inputs that are loop settings (e.g. grad_accum)

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Always run: queueing again resumes an interrupted run or continues to a higher step count.
        return float("nan")

    @classmethod
    def task_inputs(cls) -> dict:
        """Method-specific required inputs."""
        raise NotImplementedError

    @classmethod
    def INPUT_TYPES(cls):
        d = cls.DEFAULTS
        return {
            "required": {
                **cls.task_inputs(),
                "save_name": (
                    "STRING",
                    {"default": f"my-{cls.TASK}", "tooltip": "Run and weight file name."},
                ),
                "steps": (
                    "INT",
                    {"default": d["steps"], "min": 1, "max": 10_000_000, "tooltip": "Optimizer steps."},
                ),
                "batch_size": (
                    "INT",
                    {"default": d["batch_size"], "min": 1, "max": 1024, "tooltip": "Images per step."},
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": d["lr"],
                        "min": 1e-9,
                        "max": 1.0,
                        "step": 1e-7,
                        "tooltip": "Peak learning rate.",
                    },
                ),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seeds data order and init."},
                ),
                "resume": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Continue the run of this name if it exists (exactly, from its last step).",
                    },
                ),
                "max_minutes": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1e6,
                        "tooltip": "Stop with a checkpoint after this long (0 = no limit).",
                    },
                ),
            }
        }

    def build_task(self, **task_args):
        """The TrainTask for these widget values."""
        raise NotImplementedError

    def train_config(self, out_dir: Path, **loop_args) -> TrainConfig:
        """Loop settings; subclasses add method defaults (optimizer, EMA, intervals)."""
        return TrainConfig(out_dir=str(out_dir), **loop_args)

    def run(self, save_name, steps, batch_size, learning_rate, seed, resume, max_minutes, **task_args):
        name = check_run_name(save_name)
        loop_extra = {k: task_args.pop(k) for k in self.LOOP_INPUTS}
        out = comfy_bridge.output_directory() / "priorface_training" / self.TASK / name
        cfg = self.train_config(
            out,
            steps=steps,
            batch_size=batch_size,
            lr=learning_rate,
            seed=seed,
            max_minutes=max_minutes or None,
            log_every=max(1, min(25, steps // 50)),  # short runs still draw a curve
            device=str(comfy_bridge.torch_device()),
            **loop_extra,
        )
        task = self.build_task(**task_args)
        train(task, cfg, resume=resume)
        target = comfy_bridge.LOCATOR.search_dirs(self.MODEL_KEY)[0] / (name + self.EXPORT_SUFFIX)
        published = publish(out / ("latest" + self.EXPORT_SUFFIX), target)
        return (str(published), _png_image(out / "curves.png"), _png_image(_latest_png(out / "samples")))


def _folder_input(tooltip: str, default: str = "") -> tuple:
    return ("STRING", {"default": default, "tooltip": tooltip})


class LLVFSRTrainNode(TrainingNodeBase):
    """Trains LLV-FSR on a folder of aligned HQ faces with the embedded priors."""

    NODE_ID = "PriorFaceTrainLLVFSR"
    DISPLAY_NAME = "PriorFace Train LLV-FSR"
    DESCRIPTION = (
        "Trains LLV-FSR (L1, Adam 0.9/0.99, cosine lr) on HQ faces framed like the UTKFace template, with the "
        "embedded priors (landmark mask, MiniLM caption embeddings). Shows progress; Cancel keeps the last step "
        "and queueing again resumes. The result appears in the LLV-FSR Loader's list."
    )
    TASK = "llvfsr"
    MODEL_KEY = "priorface_llvfsr"
    DEFAULTS = {"steps": 4000, "batch_size": 16, "lr": 2e-4}

    @classmethod
    def task_inputs(cls) -> dict:
        from ..inference.degradations.pipeline import MODES
        from ..models.llvfsr import PRESETS, VARIANTS

        return {
            "train_folder": _folder_input("Folder of aligned HQ face images (png/jpg)."),
            "val_folder": _folder_input("Optional held-out folder for PSNR/SSIM/identity and sample grids."),
            "size": (
                "INT",
                {"default": 128, "min": 32, "max": 1024, "step": 8, "tooltip": "HR side in pixels."},
            ),
            "degradation": (
                list(MODES),
                {"default": "bicubic_x8", "tooltip": "How LR inputs are made from HQ."},
            ),
            "variant": (
                list(VARIANTS),
                {"default": "full", "tooltip": "full = LVPFB; model1/model2 = paper ablations."},
            ),
            "preset": (sorted(PRESETS), {"default": "small", "tooltip": "Network width/depth preset."}),
            "prior_dropout": (
                "FLOAT",
                {
                    "default": 0.3,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.05,
                    "tooltip": "Chance to drop each prior in training.",
                },
            ),
        }

    def train_config(self, out_dir: Path, **loop_args) -> TrainConfig:
        return TrainConfig(
            out_dir=str(out_dir),
            lr_schedule="cosine",
            ema_decay=0.999,
            val_every=500,
            ckpt_every=250,
            **loop_args,
        )

    def build_task(self, train_folder, val_folder, size, degradation, variant, preset, prior_dropout):
        from ..inference.degradations.pipeline import BICUBIC_MODES
        from ..training.llvfsr_task import LLVFSRTask, LLVFSRTaskConfig

        train_dir = _existing_folder(train_folder, "train_folder")
        val_dirs = [str(_existing_folder(val_folder, "val_folder"))] if val_folder.strip() else []
        scale = BICUBIC_MODES.get(degradation, 4)  # blind/Real-ESRGAN: x4 like configs/llvfsr/blind.json
        model = {"scale": scale, "variant": variant, "prior_dropout": prior_dropout}
        return LLVFSRTask(
            LLVFSRTaskConfig(
                train_dirs=[str(train_dir)],
                val_dirs=val_dirs,
                val_source_template=None,
                size=size,
                degradation=degradation,
                preset=preset,
                model=model,
            )
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
            "base_model": (bases, {"default": bases[0], "tooltip": "SD1.5 single file or diffusers folder."}),
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
        base_model,
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

        base = resolve_base(comfy_bridge.LOCATOR, base_model)
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


def _existing_folder(text: str, what: str) -> Path:
    path = Path(text.strip()).expanduser()
    if not text.strip() or not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {text!r} does not exist (give an absolute path)")
    return path


NODES = [LLVFSRTrainNode, XPSRTrainNode]
