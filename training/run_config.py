"""Run a training job described by a JSON file: {"task": name, "task_config": {...}, "train": {...}}.

Relative paths inside the file are relative to the folder the command runs in (the README's
commands run from the repository root).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .loop import TrainConfig, train

# task name -> (module in this package, task class, config class); imported only when used
TASK_CLASSES = {
    "llvfsr": ("llvfsr_task", "LLVFSRTask", "LLVFSRTaskConfig"),
    "xpsr": ("xpsr_task", "XPSRTask", "XPSRTaskConfig"),
    "authface_stage1": ("authface_stage1", "AuthFaceStage1Task", "AuthFaceStage1Config"),
    "authface_stage2": ("authface_stage2", "AuthFaceStage2Task", "AuthFaceStage2Config"),
    "vspbfr_code_diffuser": ("vspbfr_tasks", "CodeDiffuserTask", "CodeDiffuserTaskConfig"),
    "vspbfr_restoration": ("vspbfr_tasks", "RestorationTask", "RestorationTaskConfig"),
}
TASKS = tuple(TASK_CLASSES)


def load_job(path: str | Path) -> dict[str, Any]:
    """Read and check a job file."""
    path = Path(path)
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"training config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = {"task", "task_config", "train"} - set(job)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; expected keys task, task_config, train")
    if job["task"] not in TASKS:
        raise ValueError(f"{path}: unknown task {job['task']!r}; expected one of {TASKS}")
    return job


def build_task(job: dict[str, Any]):
    """The TrainTask a job names."""
    import importlib

    module_name, task_name, config_name = TASK_CLASSES[job["task"]]
    module = importlib.import_module(f".{module_name}", __package__)
    config_cls = getattr(module, config_name)
    try:
        config = config_cls(**job["task_config"])
    except TypeError as e:
        raise ValueError(f"task_config does not fit {config_name}: {e}") from None
    return getattr(module, task_name)(config)


def run_job(
    path: str | Path, out_dir: str | None = None, resume: bool = True, steps: int | None = None
) -> dict:
    """Train (or resume) the job in ``path``; ``out_dir``/``steps`` override the file's values."""
    job = load_job(path)
    train_cfg = dict(job["train"])
    if out_dir:
        train_cfg["out_dir"] = out_dir
    if steps:
        train_cfg["steps"] = steps
    cfg = TrainConfig(**train_cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "job.json").write_text(json.dumps({**job, "train": train_cfg}, indent=1))
    return train(build_task(job), cfg, resume=resume)
