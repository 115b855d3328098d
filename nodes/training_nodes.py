"""Training nodes: the headless trainers (training/) run inside ComfyUI for artists.

Each node builds the same task the ``priorface train`` command builds, runs the shared loop with
ComfyUI's progress bar and Cancel button (a cancelled run keeps its last step; queueing the node
again resumes it exactly), and publishes the exported weights into the method's model folder so
the method's loader lists them without a restart. The run folder (state, log.csv, curves.png,
samples/) lives in ComfyUI's output directory under ``priorface_training/<method>/<name>``.

Loop settings (optimizer, betas, EMA, precision, intervals) of the AuthFace and VSPBFR nodes are
read from the shipped job files in configs/, the same files ``priorface train`` runs, so the node
and the command line train with the official/paper settings.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch

from ..inference.images import bchw_to_image, load_image_file
from ..training.loop import TrainConfig, train
from . import comfy_bridge

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOBS = Path(__file__).resolve().parents[1] / "configs"
# Keys of a job file's "train" section that are method settings (the rest are widgets or the run folder).
LOOP_KEYS = (
    "optimizer",
    "betas",
    "eps",
    "weight_decay",
    "lr_schedule",
    "warmup_steps",
    "grad_accum",
    "grad_clip",
    "ema_decay",
    "precision",
    "val_every",
    "ckpt_every",
)


@functools.cache
def shipped_job(name: str) -> dict:
    """A shipped job file, e.g. ``shipped_job("authface/stage1")`` reads configs/authface/stage1.json."""
    path = JOBS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"shipped training config {path} is missing; reinstall PriorFace")
    return json.loads(path.read_text())


def job_loop_settings(name: str) -> dict:
    """The loop settings of a shipped job (optimizer, betas, EMA, precision, grad_accum, intervals)."""
    train_section = shipped_job(name)["train"]
    settings = {k: train_section[k] for k in LOOP_KEYS if k in train_section}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    return settings


def job_defaults(name: str) -> dict:
    """Widget defaults (steps, batch_size, lr) of a shipped job."""
    t = shipped_job(name)["train"]
    return {"steps": t["steps"], "batch_size": t["batch_size"], "lr": t["lr"]}


def job_task_settings(name: str, keys: tuple[str, ...]) -> dict:
    """The named task settings of a shipped job (copied, so callers may change them)."""
    task = shipped_job(name)["task_config"]
    return json.loads(json.dumps({k: task[k] for k in keys if k in task}))


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
    JOB = ""  # shipped job file (configs/<JOB>.json) whose loop settings train_config uses

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
        """Loop settings: the shipped job's (when JOB is set), overridden by the widgets."""
        settings = job_loop_settings(self.JOB) if self.JOB else {}
        return TrainConfig(out_dir=str(out_dir), **{**settings, **loop_args})

    def source_files(self) -> list[Path]:
        """Model files the last built task reads (publishing must never overwrite one of them)."""
        return list(getattr(self, "_sources", []))

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
        target = comfy_bridge.LOCATOR.search_dirs(self.MODEL_KEY)[0] / (name + self.EXPORT_SUFFIX)
        for source in self.source_files():
            if source.resolve() == target.resolve():
                raise ValueError(
                    f"save name {name!r} would overwrite the input {source}; choose another save name"
                )
        # ComfyUI runs every node under torch.inference_mode(); training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            train(task, cfg, resume=resume)
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


def _file_input(tooltip: str) -> tuple:
    return ("STRING", {"default": "", "tooltip": tooltip})


def _optional_folder(text: str, what: str) -> list[str]:
    """[folder] when the widget names one, [] when it is empty."""
    return [str(_existing_folder(text, what))] if text.strip() else []


def _optional_file(text: str, what: str) -> str | None:
    """The file a widget names (checked), or None when it is empty."""
    if not text.strip():
        return None
    path = Path(text.strip()).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {text!r} does not exist (give an absolute path)")
    return str(path)


def _float_input(default: float, tooltip: str, lo: float = 0.0, hi: float = 1e4, step: float = 0.01) -> tuple:
    return ("FLOAT", {"default": float(default), "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _grad_accum_input(default: int) -> tuple:
    return (
        "INT",
        {
            "default": int(default),
            "min": 1,
            "max": 256,
            "tooltip": "Batches per optimizer step (effective batch = batch_size x grad_accum).",
        },
    )


# -- AuthFace ---------------------------------------------------------------------------------------
def _existing_folder(text: str, what: str) -> Path:
    path = Path(text.strip()).expanduser()
    if not text.strip() or not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {text!r} does not exist (give an absolute path)")
    return path


NODES = [LLVFSRTrainNode]
