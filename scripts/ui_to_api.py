"""Regenerate the API-format twins in workflows/api/ from the UI-format workflows in workflows/.

    python scripts/ui_to_api.py          # rewrite every twin
    python scripts/ui_to_api.py --check  # exit 1 when a twin is out of date

Widget values are matched to input names in the order of each node's INPUT_TYPES (PriorFace nodes
are read from the pack; ComfyUI built-ins from BUILTIN_WIDGETS below), skipping inputs that are
connected by a link, and the extra "control after generate" value the front end stores after a
'seed' widget. Note nodes carry no computation and are dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
NOTE_TYPES = {"Note", "MarkdownNote"}

# Widget inputs (in order) and output types of the ComfyUI built-ins our workflows use (0.3.64).
BUILTIN_WIDGETS = {
    "LoadImage": (["image", "upload"], ["IMAGE", "MASK"]),
    "SaveImage": (["filename_prefix"], []),
    "PreviewImage": ([], []),
    "PreviewAny": ([], []),
    "CheckpointLoaderSimple": (["ckpt_name"], ["MODEL", "CLIP", "VAE"]),
    "ControlNetLoader": (["control_net_name"], ["CONTROL_NET"]),
    "CLIPTextEncode": (["text"], ["CONDITIONING"]),
    "ControlNetApplyAdvanced": (
        ["strength", "start_percent", "end_percent"],
        ["CONDITIONING", "CONDITIONING"],
    ),
    "EmptyLatentImage": (["width", "height", "batch_size"], ["LATENT"]),
    "KSampler": (
        ["seed", "__control_after_generate__", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        ["LATENT"],
    ),
    "VAEDecode": ([], ["IMAGE"]),
    "ImageScale": (["upscale_method", "width", "height", "crop"], ["IMAGE"]),
}
BUILTIN_INPUTS = {
    "SaveImage": {"images": "IMAGE"},
    "PreviewImage": {"images": "IMAGE"},
    "LoadImage": {},
    "PreviewAny": {"source": "*"},
    "CheckpointLoaderSimple": {},
    "ControlNetLoader": {},
    "CLIPTextEncode": {"clip": "CLIP"},
    "ControlNetApplyAdvanced": {
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "control_net": "CONTROL_NET",
        "image": "IMAGE",
        "vae": "VAE",
    },
    "EmptyLatentImage": {},
    "KSampler": {
        "model": "MODEL",
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "latent_image": "LATENT",
    },
    "VAEDecode": {"samples": "LATENT", "vae": "VAE"},
    "ImageScale": {"image": "IMAGE"},
}


def pack_nodes() -> dict:
    """PriorFace's NODE_CLASS_MAPPINGS, loaded with the test suite's small ComfyUI fake."""
    sys.path.insert(0, str(ROOT / "tests" / "fake_comfy"))
    import folder_paths

    folder_paths.reset(str(ROOT / ".no-models"))
    import priorface
    from priorface.nodes import comfy_bridge

    comfy_bridge.register_model_folders()  # idempotent; needed when folder_paths was reset above
    return priorface.NODE_CLASS_MAPPINGS


def widget_names(node_type: str, nodes: dict, linked: set[str]) -> list[str]:
    """Names of the inputs that appear as widgets, in widgets_values order."""
    if node_type in BUILTIN_WIDGETS:
        return BUILTIN_WIDGETS[node_type][0]
    spec = nodes[node_type].INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")
            if is_widget and name not in linked:
                names.append(name)
                if name == "seed":
                    names.append("__control_after_generate__")
    return names


def ui_to_api(ui: dict, nodes: dict) -> dict:
    """Convert one UI-format graph to the API format ComfyUI's /prompt accepts."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in NOTE_TYPES:
            continue
        inputs = {}
        linked = set()
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _id, src, src_slot, _dst, _slot, _type = links[inp["link"]]
                inputs[inp["name"]] = [str(src), src_slot]
                linked.add(inp["name"])
        names = widget_names(node["type"], nodes, linked)
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {names}")
        for name, value in zip(names, values, strict=True):
            if name not in ("upload", "__control_after_generate__"):
                inputs[name] = value
        api[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title", node["type"])},
        }
    return api


def main(argv=None) -> int:
    """Write (or with --check, compare) every API twin."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report twins that are out of date")
    args = parser.parse_args(argv)
    nodes = pack_nodes()
    stale = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        api = ui_to_api(json.loads(path.read_text()), nodes)
        target = WORKFLOWS / "api" / path.name
        text = json.dumps(api, indent=2) + "\n"
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
    if stale:
        print("out of date: " + ", ".join(stale) + " (run python scripts/ui_to_api.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
