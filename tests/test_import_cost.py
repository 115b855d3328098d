"""Start-up cost: neither headless import nor ComfyUI-style loading pulls in heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_COMFY = Path(__file__).parent / "fake_comfy"
HEAVY = ("diffusers", "transformers", "segment_anything", "xformers", "dlib", "open_clip", "accelerate")

_REPORT = """
import json, sys, time
heavy = {heavy!r}
print(json.dumps({{"loaded": sorted(m for m in sys.modules if m.split('.')[0] in heavy),
                   "seconds": time.perf_counter() - t0, "extra": extra}}))
"""


def _run(body: str) -> dict:
    code = "import time\nt0 = time.perf_counter()\nextra = None\n" + body + _REPORT.format(heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_headless_import_is_light():
    result = _run(
        "import priorface, priorface.models, priorface.inference, priorface.training, priorface.client\n"
    )
    assert result["loaded"] == [], f"heavy modules imported at start-up: {result['loaded']}"


def test_headless_import_does_not_touch_torch():
    result = _run("import priorface\nimport sys\nextra = 'torch' in sys.modules\n")
    assert result["extra"] is False, "importing priorface must not import torch"


def test_comfyui_style_load_is_light():
    """Load the pack as ComfyUI does: module named by its path, then read NODE_CLASS_MAPPINGS."""
    body = f"""
import importlib.util, sys
sys.path.insert(0, {str(FAKE_COMFY)!r})
import folder_paths; folder_paths.reset('/nonexistent/models')
name = {str(REPO_ROOT)!r}
spec = importlib.util.spec_from_file_location(name, {str(REPO_ROOT / "__init__.py")!r})
module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module)
extra = sorted(module.NODE_CLASS_MAPPINGS)
"""
    result = _run(body)
    assert result["loaded"] == [], f"heavy modules imported when ComfyUI loads the pack: {result['loaded']}"
    assert result["extra"], "no nodes registered"
    assert all(n.startswith("PriorFace") for n in result["extra"])
