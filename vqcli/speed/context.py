"""Running the model fast: device placement, memory format, inference mode and bounded memory."""

from __future__ import annotations

import contextlib

import torch

from vqcli.speed.budget import default_budget
from vqcli.speed.fastpath import use_fast_paths
from vqcli.speed.tiling import bounded_memory


def memory_format_for(dtype: torch.dtype) -> torch.memory_format:
    """channels-last for reduced precision (where it pays), contiguous NCHW for float32."""
    return torch.contiguous_format if dtype == torch.float32 else torch.channels_last


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move the model to ``device`` in eval mode with the memory format that suits ``dtype``.

    The weights stay float32: reduced precision comes from autocast, which keeps the precision-
    sensitive operations (GroupNorm statistics, softmax) in float32.
    """
    return use_fast_paths(model.to(device=device).eval().to(memory_format=memory_format_for(dtype)))


def compute_context(
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: torch.nn.Module | None = None,
    budget: int | None = None,
    compile: bool = False,
) -> contextlib.AbstractContextManager:
    """Inference mode and autocast for ``dtype``, as one context; with ``model``, also its memory
    bound (``budget`` bytes, default ``default_budget(device)``: large images are computed in
    tiles, with the untiled result), and with ``compile`` its coders' torch.compile'd forms where
    an image fits whole. The process's allocator is left alone (a run tunes it: ``speed.heap``)."""
    stack = contextlib.ExitStack()
    if model is not None:
        stack.enter_context(bounded_memory(model, budget or default_budget(device), compile=compile))
    stack.enter_context(torch.inference_mode())
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack
