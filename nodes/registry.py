"""Single registration point: builds ComfyUI's node mappings and enforces the naming contract."""

from __future__ import annotations

NODE_PREFIX = "PriorFace"
CATEGORY_ROOT = "PriorFace"


def build_mappings(node_classes: list[type]) -> tuple[dict[str, type], dict[str, str]]:
    """Return (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) from classes with NODE_ID/DISPLAY_NAME."""
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    for cls in node_classes:
        node_id = getattr(cls, "NODE_ID", None)
        if not node_id or not node_id.startswith(NODE_PREFIX):
            raise ValueError(f"{cls.__name__}: NODE_ID must start with {NODE_PREFIX!r}, got {node_id!r}")
        if node_id in classes:
            raise ValueError(
                f"duplicate node id {node_id!r} ({classes[node_id].__name__} and {cls.__name__})"
            )
        category = getattr(cls, "CATEGORY", "")
        if not (category == CATEGORY_ROOT or category.startswith(CATEGORY_ROOT + "/")):
            raise ValueError(f"{node_id}: CATEGORY must be under {CATEGORY_ROOT!r}, got {category!r}")
        classes[node_id] = cls
        names[node_id] = cls.DISPLAY_NAME
    return classes, names
