"""Shipped workflows: known node types, matching link types, valid widgets, API twins in step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
# Inputs whose options are the files found in a model folder: a shipped workflow names the file the
# user is told to download (its note says where it goes), which need not exist here.
MODEL_FILE_INPUTS = {"model_name", "sam_name", "weights", "detector"}


def _converter():
    spec = importlib.util.spec_from_file_location("ui_to_api", ROOT / "scripts" / "ui_to_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _types(converter, nodes, node_type):
    """(input name -> type, output types) of a node type."""
    if node_type in converter.BUILTIN_WIDGETS:
        return converter.BUILTIN_INPUTS[node_type], converter.BUILTIN_WIDGETS[node_type][1]
    spec = nodes[node_type].INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            inputs[name] = "COMBO" if isinstance(entry[0], list) else entry[0]
    return inputs, list(nodes[node_type].RETURN_TYPES)


def test_there_are_workflows():
    assert UI_FILES, "no workflows shipped"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_workflow_matches_node_definitions(comfy_env, path):
    converter = _converter()
    nodes = comfy_env.nodes.NODE_CLASS_MAPPINGS
    ui = json.loads(path.read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        assert (
            n["type"] in nodes or n["type"] in converter.BUILTIN_WIDGETS or n["type"] in converter.NOTE_TYPES
        ), n
    assert any(n["type"] in converter.NOTE_TYPES for n in ui["nodes"]), "every workflow carries a note"
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        _, outputs = _types(converter, nodes, by_id[src]["type"])
        inputs, _ = _types(converter, nodes, by_id[dst]["type"])
        dst_name = by_id[dst]["inputs"][dst_slot]["name"]
        assert outputs[src_slot] == link_type, (
            f"link {link_id}: type {link_type} vs output {outputs[src_slot]}"
        )
        assert inputs[dst_name] in (link_type, "*"), f"link {link_id}: {link_type} into {inputs[dst_name]}"
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
    api = converter.ui_to_api(ui, nodes)
    for node_id, node in api.items():
        if node["class_type"] not in nodes:
            continue
        spec = nodes[node["class_type"]].INPUT_TYPES()
        for name, value in node["inputs"].items():
            entry = {**spec["required"], **spec.get("optional", {})}[name]
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(value, list):
                continue
            if isinstance(kind, list) and name in MODEL_FILE_INPUTS and value not in kind:
                assert isinstance(value, str) and value.strip() and "(" not in value, f"node {node_id}.{name}"
            elif isinstance(kind, list):
                assert value in kind, f"node {node_id}.{name}: {value!r} is not an option"
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", float("-inf")) <= value <= opts.get("max", float("inf")), (
                    f"{node_id}.{name}"
                )


def test_api_twins_are_up_to_date(comfy_env):
    assert _converter().main(["--check"]) == 0, "run: python scripts/ui_to_api.py"
