"""Standard-library-only clients for a running ComfyUI server (never imports torch)."""
