"""Out of memory inside a batch: the same work again in tiles, under smaller budgets.

The budget (``speed.budget``) is an estimate made once at a run's start: the caching allocator's
fragmentation, cuDNN's workspaces and other processes on the same GPU can leave less than it
said. Where a batch runs out of memory (``torch.OutOfMemoryError``: CUDA's, or any device's that
raises it), it runs again under a quarter of the budget, then a quarter of that, down to
``MIN_BUDGET``. Tiling gives the untiled result (``speed.tiling``), so only the time changes;
one warning line says so. Where even the smallest budget runs out, the error is raised (the
pipeline then tries the batch's images one at a time, and fails those that do not fit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_BUDGET = 64 * 2**20  # bytes: below this the bands are so thin that their halos dominate
SHRINK = 4  # each retry's budget is this much smaller


def retry_in_tiles(run: Callable[[int], T], budget: int, *, device: torch.device) -> T:
    """``run(budget)``; where it runs out of memory, ``run`` again under budgets ``SHRINK`` times
    smaller each time, down to ``MIN_BUDGET`` (the first retry said in one warning line). Other
    errors pass through untouched."""
    current = budget
    while True:
        try:
            return run(current)
        except torch.OutOfMemoryError as e:
            # only the message is kept: the exception's traceback holds the failed attempt's tensors
            message = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        if current <= MIN_BUDGET:
            raise torch.OutOfMemoryError(f"{message} (also in tiles, with a {current >> 20} MB budget)")
        smaller = max(MIN_BUDGET, current // SHRINK)
        _release_cached(device)
        if current == budget:
            log.warning("out of memory on %s with a %d MB budget: computing in tiles instead (same result, "
                        "slower; --max-memory sets the budget)", device, budget >> 20)
        else:
            log.debug("out of memory again with a %d MB budget; retrying with %d MB", current >> 20, smaller >> 20)
        current = smaller


def _release_cached(device: torch.device) -> None:
    """Give the blocks the caching allocator holds unused back to the device, for the retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
