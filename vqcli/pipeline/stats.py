"""Per-channel statistics of a set of latents: the scale and shift a diffusion model needs.

Streamed (one file in memory at a time) and numerically stable: each file's channel means and
sums of squared deviations are computed in float64 and merged into the running ones with Chan et
al.'s pairwise update, so that partial results (shards, torchrun ranks) merge exactly as the files
would have. ``scale_factor = 1 / std`` and ``shift_factor = mean``, per channel and over all
channels together (the single numbers SD3 and FLUX publish); the std is the population one.

Scaled latents are unscaled first (``z / scale_factor + shift_factor`` with the file's own
factors), so the numbers are always those of the model's raw latents.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqcli.errors import FileError
from vqcli.io.trainer_files import read_any

STATE_FORMAT = "vqcli.latent_stats"


@dataclass
class ChannelStats:
    """Running count, mean and sum of squared deviations per channel (float64)."""

    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    files: int = 0

    @property
    def channels(self) -> int:
        return len(self.count)

    def add(self, values: np.ndarray) -> None:
        """Add one latent ``(C, h, w)``."""
        flat = np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)
        n = np.full(flat.shape[0], flat.shape[1], dtype=np.float64)
        mean = flat.mean(axis=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
        self.merge(ChannelStats(n, mean, m2, 1))

    def merge(self, other: ChannelStats) -> None:
        """Fold ``other`` in (Chan et al.'s parallel update)."""
        if other.channels == 0:
            return
        if self.channels == 0:
            self.count, self.mean, self.m2 = other.count.copy(), other.mean.copy(), other.m2.copy()
            self.files += other.files
            return
        if other.channels != self.channels:
            raise ValueError(f"{other.channels} channels where the others have {self.channels}")
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total
        self.files += other.files

    def overall(self) -> tuple[float, float]:
        """Mean and std over all channels together."""
        total = float(self.count.sum())
        mean = float((self.count * self.mean).sum() / total)
        m2 = float((self.m2 + self.count * (self.mean - mean) ** 2).sum())
        return mean, math.sqrt(m2 / total)

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)

    def state(self) -> dict:
        """The partial sums, to merge with others' (``from_state``)."""
        return {
            "format": STATE_FORMAT,
            "files": self.files,
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict, path: str | os.PathLike = "partial") -> ChannelStats:
        try:
            if state.get("format") != STATE_FORMAT:
                raise ValueError("not a partial of vqcli stats")
            arrays = [np.asarray(state[k], dtype=np.float64) for k in ("count", "mean", "m2")]
            if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or (arrays[0] <= 0).any():
                raise ValueError("counts, means and sums of squares do not match")
            if not all(np.isfinite(a).all() for a in arrays) or (arrays[2] < 0).any():
                raise ValueError("values that are not finite or negative sums of squares")
            return cls(*arrays, files=int(state.get("files", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileError(Path(path), f"not a partial result of 'vqcli stats --json' ({e})") from None

    def summary(self) -> dict:
        """The numbers to report: per channel and over all channels."""
        std = self.std()
        mean_all, std_all = self.overall()
        return {
            "files": self.files,
            "channels": self.channels,
            "values_per_channel": int(self.count[0]) if self.channels else 0,
            "mean": self.mean.tolist(),
            "std": std.tolist(),
            "scale_factor": [1.0 / s if s > 0 else None for s in std.tolist()],
            "shift_factor": self.mean.tolist(),
            "overall": {
                "mean": mean_all,
                "std": std_all,
                "scale_factor": 1.0 / std_all if std_all > 0 else None,
                "shift_factor": mean_all,
            },
        }


def raw_latent(path: Path) -> np.ndarray:
    """A latent file's main tensor as the model's raw latent (float64), or ``FileError``."""
    latent = read_any(path)
    meta = latent.meta
    if meta.kind == "vq":
        raise FileError(path, "holds codebook indices (a VQ model): they have no channel statistics")
    z = latent.tensor.double().numpy()
    return z / meta.scale_factor + meta.shift_factor if meta.scaled else z


def accumulate(paths: Iterable[Path], stats: ChannelStats | None = None) -> Iterator[tuple[Path, str | None]]:
    """Add each latent file of ``paths`` to ``stats``; ``(path, None)`` for each one added,
    ``(path, reason)`` for each that could not be."""
    stats = stats if stats is not None else ChannelStats()
    for path in paths:
        try:
            z = raw_latent(path)
            if stats.channels and z.shape[0] != stats.channels:
                raise FileError(path, f"has {z.shape[0]} channels where the others have {stats.channels}")
            stats.add(z)
        except FileError as e:
            yield path, e.reason
            continue
        yield path, None
