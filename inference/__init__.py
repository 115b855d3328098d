"""Framework-free glue on BCHW float tensors in [0, 1]: images, devices, progress, model files."""
