"""Every shipped training job file names a known task and fits that task's config class."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from priorface.training.run_config import TASK_CLASSES, build_task, load_job

JOBS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.json"))
JOBS = [p for p in JOBS if "task" in json.loads(p.read_text())]


@pytest.mark.parametrize("path", JOBS, ids=[f"{p.parent.name}/{p.name}" for p in JOBS])
def test_shipped_job_files_fit_their_task(path):
    job = load_job(path)
    module_name, _, config_name = TASK_CLASSES[job["task"]]
    config_cls = getattr(importlib.import_module(f"priorface.training.{module_name}"), config_name)
    config_cls(**job["task_config"])


def test_unknown_task_and_wrong_fields_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "nope", "task_config": {}, "train": {}}))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_job(bad)
    with pytest.raises(ValueError, match="does not fit LLVFSRTaskConfig"):
        build_task({"task": "llvfsr", "task_config": {"train_dirs": [], "no_such_field": 1}, "train": {}})
