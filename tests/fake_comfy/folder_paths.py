"""Small stand-in for ComfyUI's folder_paths module, with the behaviour PriorFace relies on."""

import os

models_dir = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
_LEGACY = {"clip": "text_encoders", "unet": "diffusion_models"}


def reset(new_models_dir: str) -> None:
    """Test helper: forget every key and point models_dir somewhere else (ComfyUI's base keys)."""
    global models_dir
    models_dir = new_models_dir
    folder_names_and_paths.clear()
    for key in ("checkpoints", "controlnet", "text_encoders", "diffusers", "vae", "loras"):
        folder_names_and_paths[key] = ([os.path.join(models_dir, key)], set(supported_pt_extensions))
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], ["folder"])


def get_output_directory() -> str:
    return os.path.join(os.path.dirname(models_dir), "output")


def map_legacy(name: str) -> str:
    return _LEGACY.get(name, name)


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    folder_name = map_legacy(folder_name)
    if folder_name in folder_names_and_paths:
        paths = folder_names_and_paths[folder_name][0]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name):
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[map_legacy(folder_name)]
    out = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    for root in get_folder_paths(folder_name):
        p = os.path.join(root, filename)
        if os.path.isfile(p):
            return p
    return None


def get_full_path_or_raise(folder_name, filename):
    p = get_full_path(folder_name, filename)
    if p is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return p
