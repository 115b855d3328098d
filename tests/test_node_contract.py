"""Every registered node obeys ComfyUI's V1 node contract and PriorFace's naming rules."""

from __future__ import annotations

import inspect

import pytest

BUILTIN_TYPES = {
    "IMAGE",
    "MASK",
    "LATENT",
    "STRING",
    "INT",
    "FLOAT",
    "BOOLEAN",
    "MODEL",
    "CLIP",
    "VAE",
    "CONDITIONING",
    "CONTROL_NET",
    "UPSCALE_MODEL",
    "SIGMAS",
    "NOISE",
    "SAMPLER",
    "GUIDER",
    "*",
}


def _own_type(t: str) -> bool:
    return t.startswith("PRIORFACE_") and t.upper() == t


def _all_nodes(comfy_env):
    return sorted(comfy_env.nodes.NODE_CLASS_MAPPINGS.items())


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and "required" in spec, (
        f"{cls.__name__}.INPUT_TYPES needs a 'required' dict"
    )
    assert set(spec) <= {"required", "optional", "hidden"}, f"{cls.__name__}: unknown sections {set(spec)}"
    return spec


def test_registry_is_not_empty_and_names_are_prefixed(comfy_env):
    nodes = _all_nodes(comfy_env)
    assert nodes
    for node_id, cls in nodes:
        assert node_id.startswith("PriorFace") and node_id == cls.NODE_ID
        assert cls.CATEGORY == "PriorFace" or cls.CATEGORY.startswith("PriorFace/")
        assert comfy_env.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("PriorFace")
        assert getattr(cls, "DESCRIPTION", ""), f"{node_id} has no DESCRIPTION"


def test_input_specs_are_well_formed(comfy_env):
    for node_id, cls in _all_nodes(comfy_env):
        spec = _inputs(cls)
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                where = f"{node_id}.{name}"
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (
                    f"{where}: spec must be (type, options)"
                )
                kind, opts = entry[0], (entry[1] if len(entry) == 2 else {})
                assert isinstance(opts, dict), f"{where}: options must be a dict"
                assert opts.get("tooltip"), f"{where}: missing tooltip"
                if isinstance(kind, list):  # COMBO
                    assert kind, f"{where}: empty COMBO"
                    if "default" in opts:
                        assert opts["default"] in kind, f"{where}: default {opts['default']!r} not in options"
                elif kind in ("INT", "FLOAT"):
                    lo, hi = opts.get("min", float("-inf")), opts.get("max", float("inf"))
                    assert "default" in opts and lo <= opts["default"] <= hi, (
                        f"{where}: default outside [min, max]"
                    )
                    if kind == "INT":
                        assert all(isinstance(opts.get(k, 0), int) for k in ("default", "min", "max", "step"))
                elif kind == "BOOLEAN":
                    assert isinstance(opts.get("default"), bool), f"{where}: BOOLEAN needs a bool default"
                elif kind == "STRING":
                    assert isinstance(opts.get("default", ""), str)
                else:
                    assert kind in BUILTIN_TYPES or _own_type(kind), f"{where}: unknown type {kind!r}"


def test_return_types_and_names_agree(comfy_env):
    for node_id, cls in _all_nodes(comfy_env):
        types = cls.RETURN_TYPES
        assert isinstance(types, tuple), f"{node_id}: RETURN_TYPES must be a tuple"
        for t in types:
            assert t in BUILTIN_TYPES or _own_type(t), f"{node_id}: unknown return type {t!r}"
        names = getattr(cls, "RETURN_NAMES", None)
        if names is not None:
            assert isinstance(names, tuple) and len(names) == len(types), f"{node_id}: RETURN_NAMES length"
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        if tips is not None:
            assert len(tips) == len(types), f"{node_id}: OUTPUT_TOOLTIPS length"
        if not types:
            assert getattr(cls, "OUTPUT_NODE", False), (
                f"{node_id}: a node without outputs must be an OUTPUT_NODE"
            )


def test_function_matches_inputs(comfy_env):
    for node_id, cls in _all_nodes(comfy_env):
        fn = getattr(cls, cls.FUNCTION, None)
        assert callable(fn), f"{node_id}: FUNCTION {cls.FUNCTION!r} is not a method"
        params = inspect.signature(fn).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        spec = _inputs(cls)
        declared = {**spec.get("required", {}), **spec.get("optional", {}), **spec.get("hidden", {})}
        for name in spec["required"]:
            assert name in params or accepts_kwargs, f"{node_id}: required input {name!r} not a parameter"
        for name in spec.get("optional", {}):
            p = params.get(name)
            assert accepts_kwargs or (p is not None and p.default is not p.empty), (
                f"{node_id}: optional input {name!r} needs a parameter with a default"
            )
        for name, p in params.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            assert name in declared, f"{node_id}: parameter {name!r} is not a declared input"
            if name not in spec["required"]:
                assert p.default is not p.empty, f"{node_id}: parameter {name!r} must have a default"


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_image_to_rgb_outputs_obey_types(comfy_env, check_outputs, channels):
    import torch

    cls = comfy_env.nodes.NODE_CLASS_MAPPINGS["PriorFaceImageToRGB"]
    image = torch.rand(2, 8, 6, channels)
    image_out, transparency = check_outputs(cls, cls().convert(image, "white"))
    assert image_out.shape == (2, 8, 6, 3) and transparency.shape == (2, 8, 6)
    if channels in (2, 4):
        alpha = image[..., -1:]
        expected = (
            image[..., :3] * alpha + (1 - alpha) if channels == 4 else image[..., :1] * alpha + (1 - alpha)
        )
        assert torch.allclose(image_out, expected.expand(2, 8, 6, 3), atol=1e-6)
        assert torch.allclose(transparency, 1 - image[..., -1])
    else:
        assert float(transparency.abs().max()) == 0.0


def test_model_folders_node_lists_files(comfy_env, check_outputs):
    sams = comfy_env.models_dir / "sams"
    sams.mkdir(parents=True)
    (sams / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    (sams / "notes.txt").write_text("not a model")
    cls = comfy_env.nodes.NODE_CLASS_MAPPINGS["PriorFaceModelFolders"]
    (text,) = check_outputs(cls, cls().report("sams"))
    assert "sam_vit_b_01ec64.pth" in text and "notes.txt" not in text and str(sams) in text
