"""ComfyUI node layer: the only code that imports ``comfy`` and ``folder_paths``.

Importing this package wires the library to ComfyUI (model folders, progress, interruption) and
builds the node mappings from each node module's ``NODES`` list.
"""

from . import (
    authface_nodes,
    comfy_bridge,
    compare_nodes,
    degradation_nodes,
    face_nodes,
    hf_prior_nodes,
    llvfsr_nodes,
    metric_nodes,
    prior_nodes,
    sam_nodes,
    train_sd_nodes,
    train_vspbfr_nodes,
    training_nodes,
    utility_nodes,
    vspbfr_nodes,
    xpsr_nodes,
)
from .registry import build_mappings

comfy_bridge.install()

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build_mappings(
    [
        *utility_nodes.NODES,
        *face_nodes.NODES,
        *degradation_nodes.NODES,
        *metric_nodes.NODES,
        *compare_nodes.NODES,
        *prior_nodes.NODES,
        *hf_prior_nodes.NODES,
        *llvfsr_nodes.NODES,
        *authface_nodes.NODES,
        *sam_nodes.NODES,
        *training_nodes.NODES,
        *train_sd_nodes.NODES,
        *train_vspbfr_nodes.NODES,
        *xpsr_nodes.NODES,
        *vspbfr_nodes.NODES,
    ]
)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
