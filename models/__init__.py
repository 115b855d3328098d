"""Plain-torch model architectures and the checkpoint module (no ComfyUI, no I/O elsewhere)."""
