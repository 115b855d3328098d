"""Progress backends (headless and ComfyUI), interruption, device and dtype choice."""

from __future__ import annotations

import pytest
import torch

from priorface.inference import progress
from priorface.inference.device import resolve_device, resolve_dtype, xformers_usable


def test_headless_interrupt_stops_the_loop():
    done = 0
    with pytest.raises(progress.InterruptedByUser):
        with progress.progress_bar(10, "test") as bar:
            for i in range(10):
                if i == 3:
                    progress.request_interrupt()
                bar.update(1)
                done += 1
    assert done == 3
    progress.check_interrupted()  # the request is consumed: a new run starts clean


def test_comfy_backend_reports_and_interrupts(comfy_env):
    with progress.progress_bar(4, "sampling") as bar:
        bar.update(1)
        bar.update(1, preview="PIL-image")
    assert comfy_env.updates[0][:2] == (1, 4)
    assert comfy_env.updates[1] == (2, 4, ("JPEG", "PIL-image", 512))
    comfy_env.model_management.interrupt_current_processing()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        progress.check_interrupted()


def test_cpu_uses_fp32_even_when_half_is_asked():
    cpu = resolve_device("cpu")
    assert resolve_dtype(cpu, "fp16") is torch.float32
    assert resolve_dtype(cpu, "auto") is torch.float32
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype(cpu, "fp8")


def test_xformers_never_on_cpu():
    import sys

    assert xformers_usable(torch.device("cpu")) is False
    assert "xformers" not in sys.modules


def test_cuda_request_without_gpu_is_clear():
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda")
