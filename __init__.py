"""PriorFace: prior-driven face restoration and face super-resolution for ComfyUI and headless use.

Importing this package is cheap on purpose: no torch models, no diffusers, transformers or
segment_anything. ComfyUI asks for ``NODE_CLASS_MAPPINGS``; only then are the node modules
imported (they need ComfyUI's ``comfy`` and ``folder_paths`` modules). Headless code imports
``priorface.models``, ``priorface.inference`` or ``priorface.training`` directly.
"""

__version__ = "0.1.0"

# Names that ComfyUI reads from a custom-node package; resolved lazily by __getattr__.
_NODE_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")

__all__ = ["__version__", *_NODE_EXPORTS]


def __getattr__(name):
    """Load the ComfyUI node mappings on first access (PEP 562 module attribute)."""
    if name in _NODE_EXPORTS:
        try:
            from . import nodes
        except AttributeError as e:
            # ComfyUI probes with hasattr(), which would swallow an AttributeError raised while the
            # node modules import and skip the pack silently; re-raise so the traceback is shown.
            raise ImportError(f"PriorFace nodes failed to import: {e!r}") from e
        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
