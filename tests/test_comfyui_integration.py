"""Opt-in: start a real ComfyUI with the pack and run graphs through its HTTP API.

Set PRIORFACE_COMFYUI_DIR to a ComfyUI checkout (with its requirements installed) to run it:
    PRIORFACE_COMFYUI_DIR=~/ComfyUI pytest -m comfyui tests/test_comfyui_integration.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("PRIORFACE_COMFYUI_DIR")

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set PRIORFACE_COMFYUI_DIR to a ComfyUI checkout"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, payload: dict):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "PriorFace").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "input").mkdir()
    from PIL import Image

    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(base / "input" / "rgba.png")
    # A folder known only through extra_model_paths.yaml must show up in PriorFace's listing.
    (base / "elsewhere" / "sams").mkdir(parents=True)
    (base / "elsewhere" / "sams" / "sam_from_yaml.pth").write_bytes(b"0")
    (base / "extra.yaml").write_text(f"other:\n  base_path: {base / 'elsewhere'}\n  sams: sams\n")
    port = _free_port()
    log_path = base / "server.log"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--extra-model-paths-config",
        str(base / "extra.yaml"),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"ComfyUI exited early:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not come up within 120 s")
        yield url, base, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run(url: str, graph: dict, timeout: float = 120.0) -> dict:
    prompt_id = _post(url + "/prompt", {"prompt": graph, "client_id": "priorface-test"})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.3)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def test_pack_imports_without_failure(server):
    _url, base, log_path = server
    log = log_path.read_text()
    ours = [line for line in log.splitlines() if "custom_nodes/PriorFace" in line and "seconds" in line]
    assert ours, f"PriorFace missing from the import times list:\n{log[-3000:]}"
    assert "IMPORT FAILED" not in ours[0], ours[0]
    seconds = float(re.search(r"([\d.]+) seconds", ours[0]).group(1))
    assert seconds < 1.0, f"pack import took {seconds} s"


def test_every_node_is_listed(server):
    url, _base, _log = server
    info = _get(url + "/object_info")
    sys.path.insert(0, str(Path(__file__).parent / "fake_comfy"))
    import priorface

    ours = {k for k in info if k.startswith("PriorFace")}
    expected = set(priorface.NODE_CLASS_MAPPINGS)
    assert expected <= ours, f"not listed by /object_info: {sorted(expected - ours)}"
    for node_id in expected:
        assert info[node_id]["category"].startswith("PriorFace")


def test_api_graph_runs(server):
    url, base, _log = server
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rgba.png"}},
        "2": {"class_type": "PriorFaceImageToRGB", "inputs": {"image": ["1", 0], "background": "white"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "priorface_test"}},
        "4": {"class_type": "PriorFaceModelFolders", "inputs": {"kind": "sams"}},
    }
    result = _run(url, graph)
    assert result["status"]["status_str"] == "success", result["status"]
    saved = result["outputs"]["3"]["images"][0]
    from PIL import Image

    img = Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"])
    assert img.size == (40, 30) and img.mode == "RGB"
    assert "[sams]" in result["outputs"]["4"]["text"][0]
    assert "sam_from_yaml.pth" in result["outputs"]["4"]["text"][0]


FFHQ_FACE = REPO_ROOT.parent / "shared" / "data" / "faces" / "dev" / "ffhq" / "00000.png"


@pytest.mark.skipif(not FFHQ_FACE.is_file(), reason="shared FFHQ face not present")
@pytest.mark.parametrize("name", ["face_crop_and_paste", "priors_preview", "llvfsr_restore_photo"])
def test_shipped_workflow_runs(server, name):
    """The API twin of a shipped workflow runs as shipped on a real face."""
    import shutil

    if name.startswith("llvfsr") and not (REPO_ROOT / "weights" / "llvfsr-x8.safetensors").is_file():
        pytest.skip("embedded LLV-FSR weights not present")
    url, base, _log = server
    shutil.copy(FFHQ_FACE, base / "input" / "example.png")
    graph = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    result = _run(url, graph, timeout=300)
    assert result["status"]["status_str"] == "success", result["status"]
    assert result["outputs"], "the workflow produced no outputs"


def test_workflows_are_listed_as_templates(server):
    url, _base, _log = server
    templates = _get(url + "/workflow_templates")
    assert "face_crop_and_paste" in templates.get("PriorFace", []), templates
    served = _get(url + "/api/workflow_templates/PriorFace/face_crop_and_paste.json")
    assert any(n["type"] == "PriorFaceDetectFaces" for n in served["nodes"])


API_TWINS = sorted((REPO_ROOT / "workflows" / "api").glob("*.json"))
# Inputs whose options are the files of a model folder (PriorFace loaders and ComfyUI's own): a shipped
# workflow names the file its note tells the user to add, which this bare server does not have.
MODEL_FILE_INPUTS = {
    "model_name",
    "sam_name",
    "weights",
    "detector",
    "style_codec",
    "code_diffuser",
    "restoration_net",
    "checkpoint",
    "ckpt_name",
    "control_net_name",
}


def _validate_only(graph: dict, info: dict) -> tuple[dict, set, set]:
    """The graph with every output node made invalid on purpose, so the server validates but never runs it.

    ComfyUI queues a prompt as soon as one output validates, so each output gets a known complaint:
    PreviewImage becomes a SaveImage without its filename_prefix; another output loses a widget input
    that names no model file, or, without widgets, gets one of its link inputs pointed at its own output
    of another type; an output with neither (PreviewAny) is dropped. Returns (graph, sentinels as
    (node id, input name, complaint), ids of nodes no sentinel reaches, which the server would not check).
    """
    graph = json.loads(json.dumps(graph))
    sentinels = set()
    for node_id, node in list(graph.items()):
        spec = info[node["class_type"]]
        if not spec.get("output_node"):
            continue
        if node["class_type"] == "PreviewImage":
            node["class_type"] = "SaveImage"
            sentinels.add((node_id, "filename_prefix", "required_input_missing"))
            continue
        required = spec["input"].get("required", {})
        widgets = [
            n
            for n in required
            if n in node["inputs"] and not isinstance(node["inputs"][n], list) and n not in MODEL_FILE_INPUTS
        ]
        own_type = spec["output"][0] if spec["output"] else None
        links = {**spec["input"].get("optional", {}), **required}  # optional inputs first
        mistyped = [n for n, e in links.items() if isinstance(e[0], str) and e[0] not in ("*", own_type)]
        if widgets:
            del node["inputs"][widgets[-1]]
            sentinels.add((node_id, widgets[-1], "required_input_missing"))
        elif own_type and mistyped:
            node["inputs"][mistyped[0]] = [node_id, 0]
            sentinels.add((node_id, mistyped[0], "return_type_mismatch"))
        else:
            del graph[node_id]
    reached, todo = set(), [node_id for node_id, _name, _kind in sentinels]
    while todo:
        node_id = todo.pop()
        if node_id in reached:
            continue
        reached.add(node_id)
        todo += [v[0] for v in graph[node_id]["inputs"].values() if isinstance(v, list) and v[0] != node_id]
    return graph, sentinels, set(graph) - reached


@pytest.mark.parametrize("path", API_TWINS, ids=lambda p: p.name)
def test_shipped_workflow_only_lacks_its_model_files(server, path):
    """Validated by the real server: the only complaints are the model files a user must add."""
    import urllib.error

    url, base, _log = server
    graph = json.loads(path.read_text())
    for node in graph.values():
        if node["class_type"] == "LoadImage" and not (base / "input" / node["inputs"]["image"]).is_file():
            (base / "input" / node["inputs"]["image"]).write_bytes((base / "input" / "rgba.png").read_bytes())
    info = _get(url + "/object_info")
    probe, sentinels, unreached = _validate_only(graph, info)
    assert not unreached, f"nodes that only feed a PreviewAny escape validation: {sorted(unreached)}"
    # What the server must complain about: model-file values missing from its (empty) model folders.
    expected = set()
    for node_id, node in probe.items():
        spec = info[node["class_type"]]["input"]
        options = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            if (
                name in MODEL_FILE_INPUTS
                and isinstance(options[name][0], list)
                and value not in options[name][0]
            ):
                expected.add((node_id, name, "value_not_in_list"))
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(url + "/prompt", {"prompt": probe, "client_id": "priorface-test"})
    body = json.loads(err.value.read())
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body["error"]
    problems = {
        (node_id, e["extra_info"]["input_name"], e["type"])
        for node_id, node in body["node_errors"].items()
        for e in node["errors"]
    }
    planted = set(sentinels)
    assert planted <= problems, f"validation did not reach every output: {sorted(planted - problems)}"
    assert problems - planted == expected, f"unexpected complaints: {sorted(problems - planted - expected)}"


@pytest.mark.skipif(not FFHQ_FACE.is_file(), reason="shared FFHQ face not present")
def test_compare_methods_runs_with_the_llvfsr_branch(server):
    """The comparison workflow, other methods removed, scores LLV-FSR exactly as the library does."""
    if not (REPO_ROOT / "weights" / "llvfsr-x8.safetensors").is_file():
        pytest.skip("embedded LLV-FSR weights not present")
    from PIL import Image

    url, base, _log = server
    reference = Image.open(FFHQ_FACE).convert("RGB")
    degraded = reference.resize((64, 64), Image.BICUBIC)  # x8 from 512
    degraded.save(base / "input" / "degraded.png")
    reference.save(base / "input" / "reference.png")
    graph = json.loads((REPO_ROOT / "workflows" / "api" / "compare_methods.json").read_text())
    other = ("PriorFaceVSPBFR", "PriorFaceXPSR", "PriorFaceAuthFace")
    graph = {k: v for k, v in graph.items() if not v["class_type"].startswith(other)}
    compare_id = next(k for k, v in graph.items() if v["class_type"] == "PriorFaceCompareMethods")
    compare = graph[compare_id]["inputs"]
    for name in [n for n, v in compare.items() if isinstance(v, list) and v[0] not in graph]:
        del compare[name]
    assert sorted(n for n in compare if n.startswith("method_")) == ["method_1"], compare
    for node in graph.values():
        if node["class_type"] == "LoadImage":
            is_reference = node["_meta"]["title"].startswith("Reference")
            node["inputs"]["image"] = "reference.png" if is_reference else "degraded.png"
    result = _run(url, graph, timeout=300)
    assert result["status"]["status_str"] == "success", result["status"]
    table = result["outputs"][compare_id]["text"][0]
    match = re.search(r"face 0 \| LLV-FSR: ([\d.]+) dB  SSIM ([\d.]+), ID dist ([\d.]+)", table)
    assert match, table
    got_psnr, got_ssim, got_id = map(float, match.groups())
    saver = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    saved = result["outputs"][saver]["images"][0]
    grid = Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"])
    assert grid.width >= 3 * 512 and grid.height >= 512, grid.size  # degraded, LLV-FSR, reference
    assert got_id < 0.6, table  # the same person

    # The same pipeline in-process: bicubic 512 copy, UTKFace re-alignment, LLV-FSR, paste back.
    import numpy as np
    import torch

    from priorface.inference.face_pipeline import crop_faces, paste_back
    from priorface.inference.llvfsr_restore import embedded_weights, load_llvfsr_model, upscale_faces
    from priorface.inference.metrics.psnr_ssim import psnr

    def tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    big = torch.nn.functional.interpolate(tensor(degraded), size=(512, 512), mode="bicubic").clamp(0, 1)
    crops, data = crop_faces(big, "dlib", None, "utkface", 128, max_faces=1, sort="largest")
    out = upscale_faces(load_llvfsr_model(embedded_weights("llvfsr-x8")), crops)
    restored = paste_back(big, out, data, feather=0.05, color_correction="wavelet")
    want = float(psnr(restored, tensor(reference))[0])
    assert abs(got_psnr - want) < 0.02, (got_psnr, want)
    baseline = float(psnr(big, tensor(reference))[0])
    assert want > baseline - 3.0 and 0.5 < got_ssim <= 1.0, (want, baseline, got_ssim)
