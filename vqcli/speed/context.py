"""Running the model fast: device placement, memory format, the weights' precision, inference
mode and bounded memory.

Reduced precision takes one of two forms, by device:

- on the CPU, the float32 model runs under ``torch.autocast``, with the maps in channels-last:
  measured the fastest there (README, Speed);
- on CUDA, a copy of the model whose weights are cast to the reduced dtype runs without autocast
  (``compute_model``), as ``vae.to(torch.bfloat16)`` does in diffusers: autocast there casts every
  weight at every call, and on an H200 the float32 model under autocast took about 1.7x as long
  as cast weights (``benchmarks/gpu_variants.py``; README, On a GPU). The copy keeps
  ``KEEP_FLOAT32`` in float32, as autocast does through ``model.blocks.full_precision``; the maps
  stay NCHW, which ran faster than channels-last there.

Either way the original model is left as it is, float32: the redo of a non-finite result in
float32 (``pipeline.batching.compute``) runs it.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch

from vqcli.speed.budget import default_budget
from vqcli.speed.fastpath import use_fast_paths
from vqcli.speed.tiling import bounded_memory, forget_compiled

# Layers whose weights stay float32 in a cast copy: the latent's moments and its distances to the
# codebook, and the last layer before the pixels, whose rounding would land in the output directly
# (the same layers that run in float32 under autocast). Prefixes of parameter names.
KEEP_FLOAT32 = ("encoder.conv_out", "quant_conv", "quantize", "post_quant_conv", "decoder.conv_out")

# model -> (what its cast copy was made from, the copy): one copy per model, the latest asked for
_CAST_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def casts_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` on ``device`` runs a copy of the model with weights cast to it (CUDA,
    reduced precision) rather than the float32 model under autocast."""
    return device.type == "cuda" and dtype != torch.float32


def memory_format_for(dtype: torch.dtype, device: torch.device | None = None) -> torch.memory_format:
    """The memory format of the maps and weights for ``dtype`` on ``device`` (None: the CPU):
    channels-last for reduced precision on the CPU, where oneDNN's bfloat16 convolutions pay with
    it; contiguous NCHW for float32, and on CUDA always."""
    if dtype == torch.float32 or (device is not None and device.type == "cuda"):
        return torch.contiguous_format
    return torch.channels_last


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move the model to ``device`` in eval mode with the memory format that suits ``dtype``.

    The weights stay float32: reduced precision comes from autocast on the CPU, which keeps the
    precision-sensitive operations (GroupNorm statistics, softmax) in float32, and from
    ``compute_model``'s cast copy on CUDA.
    """
    fmt = memory_format_for(dtype, device)
    return use_fast_paths(model.to(device=device).eval().to(memory_format=fmt))


def _keeps_float32(name: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in KEEP_FLOAT32)


def compute_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model to run in ``dtype`` on ``device``: ``model`` itself, except where
    ``casts_weights``: then a copy with its weights in ``dtype`` but ``KEEP_FLOAT32`` in float32,
    in eval mode without gradients. ``model`` is not changed.

    The copy is made once and kept while ``model`` lives and its weights are the same tensors,
    unchanged (their addresses and version counters): weights changed in place (training, a
    load) or moved give a new copy. Call it outside ``compute_context``, whose memory bound
    patches the model's layers."""
    if not casts_weights(device, dtype):
        return model
    made_from = (dtype, tuple((p.data_ptr(), p._version) for p in model.parameters()))
    kept = _CAST_COPIES.get(model)
    if kept is not None and kept[0] == made_from:
        return kept[1]
    # Each parameter and buffer goes straight into its dtype, given to deepcopy as already copied
    # (its memo): the model's float32 weights are never duplicated whole on the device.
    memo: dict = {}
    for named in (model.named_parameters(), model.named_buffers()):
        for name, t in named:
            to = t.dtype if not t.is_floating_point() else torch.float32 if _keeps_float32(name) else dtype
            cast = t.detach().to(to, copy=True)  # (never shared with the model)
            memo[id(t)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cast
    runner = forget_compiled(copy.deepcopy(model, memo)).eval()
    _CAST_COPIES[model] = (made_from, runner)
    return runner


def compute_context(
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: torch.nn.Module | None = None,
    budget: int | None = None,
    compile: bool = False,
) -> contextlib.AbstractContextManager:
    """Inference mode and the precision ``dtype``, as one context: autocast, except where
    ``casts_weights`` (then ``model`` must be ``compute_model``'s cast copy: a ``ValueError`` for
    a float32 one). With ``model``, also its memory bound (``budget`` bytes, default
    ``default_budget(device)``: large images are computed in tiles, with the untiled result), and
    with ``compile`` its coders' torch.compile'd forms where an image fits whole. The process's
    allocator is left alone (a run tunes it: ``speed.heap``)."""
    cast = casts_weights(device, dtype)
    if cast and model is not None and all(p.dtype == torch.float32 for p in model.parameters()):
        raise ValueError(
            f"{dtype} on {device.type} runs the model with weights cast to it: pass compute_model(model, device, dtype)"
        )
    stack = contextlib.ExitStack()
    if model is not None:
        stack.enter_context(bounded_memory(model, budget or default_budget(device), compile=compile))
    stack.enter_context(torch.inference_mode())
    if dtype != torch.float32 and not cast:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack
