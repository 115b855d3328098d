"""Shared fixtures: a fake ComfyUI (comfy, folder_paths) and checks for ComfyUI value types."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

FAKE_COMFY = Path(__file__).parent / "fake_comfy"
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
# Test helper modules (tests/tiny_sd.py) import by name: tests/ has no __init__ (importlib mode).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def comfy_env(tmp_path):
    """Install the fake ComfyUI modules, point models_dir at a temp folder, import the node layer."""
    if str(FAKE_COMFY) not in sys.path:
        sys.path.insert(0, str(FAKE_COMFY))
    import comfy.model_management
    import comfy.utils
    import folder_paths

    from priorface.inference import progress

    models_dir = tmp_path / "models"
    folder_paths.reset(str(models_dir))
    comfy.utils.UPDATES.clear()
    comfy.model_management.interrupt_processing = False
    nodes = importlib.import_module("priorface.nodes")
    nodes.comfy_bridge.install()
    yield SimpleNamespace(
        folder_paths=folder_paths,
        nodes=nodes,
        models_dir=models_dir,
        updates=comfy.utils.UPDATES,
        model_management=comfy.model_management,
    )
    progress.set_backend(None)


def check_comfy_value(type_name: str, value) -> None:
    """Assert that a node output obeys ComfyUI's conventions for its declared type."""
    if type_name == "IMAGE":
        assert isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == 3, getattr(
            value, "shape", value
        )
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    elif type_name == "MASK":
        assert isinstance(value, torch.Tensor) and value.dim() == 3, getattr(value, "shape", value)
        assert value.dtype == torch.float32 and float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    elif type_name == "LATENT":
        assert isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor)
        assert value["samples"].dim() == 4
    elif type_name == "STRING":
        assert isinstance(value, str)
    elif type_name == "INT":
        assert isinstance(value, int)
    elif type_name == "FLOAT":
        assert isinstance(value, float)


@pytest.fixture
def check_outputs():
    """Check a node's returned tuple (or {'result': ...} dict) against its RETURN_TYPES."""

    def _check(node_cls, returned):
        result = returned["result"] if isinstance(returned, dict) else returned
        assert len(result) == len(node_cls.RETURN_TYPES)
        for type_name, value in zip(node_cls.RETURN_TYPES, result, strict=True):
            check_comfy_value(type_name, value)
        return result

    return _check


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny models gain nothing from threads, and on a busy CPU
    OpenMP spin-waits made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
