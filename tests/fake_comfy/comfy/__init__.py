"""Stand-in for ComfyUI's `comfy` package (utils, model_management) used by the node tests."""
