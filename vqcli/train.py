"""Training an autoencoder of this family on a folder of images.

Recipe: random crops of randomly rescaled images (0.5x to 1x, antialiased), flips and quarter turns,
and colour variety from few photographs: colour images get random channel permutations and
saturation, greyscale images are colourised with random per-channel tone curves (a model trained
mostly on grey crops forgets colour); colour and greyscale images are drawn 60:40 whatever their
share of the pixels, and each image of a group equally often. L1 + MSE reconstruction loss,
plus a small KL term (KL models) or the codebook and commitment loss (VQ models, with dead codes
re-seeded from the current batch's encoder outputs); AdamW with linear warm-up and cosine decay;
an exponential moving average of the weights, which is what gets saved. Everything random draws
from one seeded ``torch.Generator``, so a run is reproducible and a resumed run continues the same
sequence. Checkpoints are written atomically and read back with ``torch.load(weights_only=True)``.

On a GPU the images are decoded once and kept on the device as 8-bit values, and crops, rescales
and colour changes run there; the step never waits for the device except every ``report_every``
steps (loss and PSNR are read back then), so the host queues the next batch while the device
computes. ``max_minutes`` bounds a run by wall-clock time: the cosine schedule then follows the
elapsed share of that time (or of the steps, whichever is further), and at the limit the run ends
as at its last step, with the EMA weights and their latent scale and shift.

This module prints nothing: it reports through the ``on_progress`` callback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqcli import metrics
from vqcli.checkpoints.native import save_native
from vqcli.checkpoints.read import TRAIN_CHECKPOINT_FORMAT
from vqcli.checkpoints.registry import EMBEDDED
from vqcli.errors import FileError, UsageError, VqcliError
from vqcli.io.atomic import TMP_PREFIX, atomic_path
from vqcli.io.images import is_image_path, load_image
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.config import AutoEncoderConfig
from vqcli.pipeline.decode import decode_array
from vqcli.pipeline.encode import encode_array
from vqcli.speed.devices import cpu_has_amx

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = TRAIN_CHECKPOINT_FORMAT

# Architectures of the embedded models, trainable with ``vqcli train --preset NAME``.
TRAIN_PRESETS: dict[str, AutoEncoderConfig] = {name: m.architecture for name, m in EMBEDDED.items()}


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 4000  # optimizer steps
    batch_size: int = 16  # crops per step
    crop: int = 64  # crop side in pixels (a multiple of the downsampling factor)
    lr: float = 4e-4  # peak learning rate
    warmup: int = 200  # linear warm-up steps
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW, on conv weights only
    ema_decay: float = 0.999  # EMA of the weights (warmed up over the first steps)
    kl_weight: float = 1e-5  # KL models: weight of the mean KL per latent value
    vq_weight: float = 1.0  # VQ models: weight of codebook + commitment loss
    dead_code_steps: int = 100  # VQ: a code unused for this many steps is re-seeded
    min_scale: float = 0.5  # random rescale range [min_scale, 1]
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast for the forward pass
    checkpoint_every: int = 250  # steps between resumable checkpoints
    val_every: int = 500  # steps between validation PSNR measurements (with --val)
    max_minutes: float | None = None  # wall-clock limit of a run; the schedule follows the time used
    report_every: int = 1  # steps between read-backs of loss and PSNR (each waits for the device)


@dataclass
class Progress:
    """What ``train`` reports after each step."""

    step: int
    steps: int
    loss: float
    psnr: float  # on the training batch, in dB
    lr: float
    seconds: float
    val_psnr: float | None = None
    codes_used: float | None = None  # VQ: fraction of the codebook used in the last window


class ImageBank:
    """The training images, decoded once and kept as 8-bit (3, H, W) tensors on ``device``; crops
    are made there. ``max_side`` shrinks larger images (antialiased) when they are read."""

    COLOUR_SHARE = 0.6  # of the crops, when there are both colour and greyscale images

    def __init__(self, paths: Sequence[Path], *, device: torch.device | None = None, max_side: int | None = None):
        self.images: list[torch.Tensor] = []
        grey = []
        for path in paths:
            image = torch.from_numpy(load_image(path)).permute(2, 0, 1)
            if max_side is not None and max(image.shape[1:]) > max_side:
                ratio = max_side / max(image.shape[1:])
                size = (max(1, round(image.shape[1] * ratio)), max(1, round(image.shape[2] * ratio)))
                image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
            grey.append(bool(torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])))
            self.images.append(image if device is None else image.to(device))
        if not self.images:
            raise UsageError("no training images found")
        self.grey = torch.tensor(grey, dtype=torch.bool)
        # Every image of a group equally likely, whatever its size: one large photograph must not
        # drown the others.
        weights = torch.zeros(len(self.images), dtype=torch.float64)
        for group, share in ((~self.grey, self.COLOUR_SHARE), (self.grey, 1.0 - self.COLOUR_SHARE)):
            if group.any():
                weights[group] = share / int(group.sum())
        self.weights = weights / weights.sum()

    def batch(self, n: int, crop: int, min_scale: float, gen: torch.Generator) -> torch.Tensor:
        """n random augmented crops, (n, 3, crop, crop) in [-1, 1], on the images' device."""
        out = torch.empty(n, 3, crop, crop, device=self.images[0].device)
        picks = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        for i, k in enumerate(picks.tolist()):
            out[i] = self._augment(self._crop(self.images[k], crop, min_scale, gen), bool(self.grey[k]), gen)
        return out.clamp(0.0, 1.0) * 2.0 - 1.0

    @staticmethod
    def _crop(image: torch.Tensor, crop: int, min_scale: float, gen: torch.Generator) -> torch.Tensor:
        """A random square region of crop/scale pixels, scale in [min_scale, 1], resized to crop."""
        height, width = image.shape[1:]
        smallest = min(height, width)
        max_region = min(smallest, int(crop / min_scale))
        region = min(smallest, crop if max_region <= crop else int(torch.randint(crop, max_region + 1, (1,), generator=gen)))
        top = int(torch.randint(0, height - region + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - region + 1, (1,), generator=gen))
        patch = image[:, top : top + region, left : left + region].unsqueeze(0).float() / 255.0
        if region != crop:
            patch = F.interpolate(patch, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        return patch[0]

    @staticmethod
    def _augment(patch: torch.Tensor, grey: bool, gen: torch.Generator) -> torch.Tensor:
        def chance(p: float) -> bool:
            return bool(torch.rand((), generator=gen) < p)

        device = patch.device
        if chance(0.5):
            patch = patch.flip(-1)
        patch = torch.rot90(patch, int(torch.randint(0, 4, (1,), generator=gen)), dims=(1, 2))
        if grey:
            if chance(0.7):  # colourise: a different random tone curve per channel
                gammas = torch.exp((torch.rand(3, 1, 1, generator=gen) - 0.5) * 1.4).to(device)
                patch = patch.clamp(0.0, 1.0) ** gammas
        else:
            if chance(0.5):
                patch = patch[torch.randperm(3, generator=gen).to(device)]
            saturation = 0.6 + 0.8 * float(torch.rand((), generator=gen))
            luma = patch.mean(dim=0, keepdim=True)
            patch = luma + saturation * (patch - luma)
        return patch


def learning_rate(step: int, opts: TrainOptions, time_used: float = 0.0) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step, or
    when ``time_used`` (the share of ``max_minutes`` spent) reaches 1, whichever comes first."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = max((step - opts.warmup) / max(1, opts.steps - opts.warmup), time_used)
    floor = opts.lr * opts.min_lr_ratio
    return floor + (opts.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two tensors in [-1, 1] (peak-to-peak 2)."""
    return metrics.psnr_from_mse(F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item(), 2.0)


def _param_groups(model: AutoEncoder, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim == 4 else no_decay).append(p)  # conv kernels decay; norms, biases, codebook do not
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _update_ema(ema: AutoEncoder, model: AutoEncoder, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def validate(model: AutoEncoder, images: Sequence[np.ndarray]) -> float:
    """Mean PSNR (dB, on [0, 1]) of full-image reconstructions, mode latents, fp32."""
    model.eval()
    values = []
    for rgb in images:
        try:
            out = decode_array(model, encode_array(model, rgb), rgb.shape[0], rgb.shape[1])
        except ValueError as e:  # NaN or infinite values: a diverged model
            raise VqcliError(f"validation: {e} (has the training diverged?)") from None
        values.append(metrics.psnr(rgb, out))
    return float(np.mean(values))


class Trainer:
    """Holds the model, its EMA, the optimizer and the random state; ``run`` trains to ``opts.steps``.

    ``init``, a state dict of ``config``'s architecture, is where the weights start instead of a
    random initialisation (fine-tuning): a VQ codebook in it is kept, not re-seeded, and the model
    keeps the latent scale and shift of ``config`` (its diffusion models expect them)."""

    def __init__(self, config: AutoEncoderConfig, opts: TrainOptions, device: torch.device, init: dict | None = None):
        if opts.crop % config.downsampling:
            raise UsageError(f"--crop {opts.crop} must be a multiple of the downsampling factor {config.downsampling}")
        if opts.steps < 1 or opts.batch_size < 1:
            raise UsageError("--steps and --batch-size must be at least 1")
        self.config, self.opts, self.device = config, opts, device
        self.gen = torch.Generator().manual_seed(opts.seed)
        torch.manual_seed(opts.seed)  # parameter initialisation
        self.model = AutoEncoder(config).to(device).train()
        if init is not None:
            self.model.load_state_dict(init)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # The trained model's maps channels-last under bfloat16 autocast on a CPU with AMX: steps
        # 1.3x to 1.5x faster there at crops of 192 px and more; on a CPU with AVX512-BF16 alone
        # (AMD EPYC) 0.8x to 1.0x, so NCHW (benchmarks/train_speed.py). The EMA, validated and
        # saved, stays NCHW.
        cl = opts.bf16 and device.type == "cpu" and cpu_has_amx()
        self.memory_format = torch.channels_last if cl else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.99), fused=device.type == "cuda" or None
        )
        self.step = 0
        self.last_used = torch.zeros(config.n_embed, dtype=torch.long, device=device) if config.kind == "vq" else None
        self.codebook_ready = config.kind != "vq" or init is not None
        self.fine_tuned = init is not None
        self.reported: dict = {"loss": math.nan, "psnr": math.nan, "codes_used": None}  # the last values read back

    # --- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "options": json.dumps(dataclasses.asdict(self.opts), sort_keys=True),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.gen.get_state(),
            "last_used": self.last_used,
            "codebook_ready": self.codebook_ready,
            "fine_tuned": self.fine_tuned,
        }

    def save_checkpoint(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    @classmethod
    def resume(
        cls,
        path: Path,
        device: torch.device,
        *,
        steps: int | None = None,
        crop: int | None = None,
        batch_size: int | None = None,
        max_minutes: float | None = None,
    ) -> "Trainer":
        """Continue from a checkpoint, optionally with a new total of steps or new crops (for
        example larger crops late in training); None keeps what the checkpoint says."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one clear message
            raise FileError(path, f"not a readable vqcli training checkpoint ({type(e).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise FileError(path, "not a vqcli training checkpoint")
        config = AutoEncoderConfig.from_dict(json.loads(state["config"]))
        opts = TrainOptions(**json.loads(state["options"]))
        changes = dict(steps=steps, crop=crop, batch_size=batch_size, max_minutes=max_minutes)
        opts = dataclasses.replace(opts, **{k: v for k, v in changes.items() if v is not None})
        trainer = cls(config, opts, device)
        trainer.model.load_state_dict(state["model"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.gen.set_state(state["generator"])
        trainer.step = int(state["step"])
        trainer.last_used = state["last_used"].to(device) if state["last_used"] is not None else None
        trainer.codebook_ready = bool(state["codebook_ready"])
        trainer.fine_tuned = bool(state.get("fine_tuned", False))
        return trainer

    # --- one step -------------------------------------------------------------------------------
    def _seed_codebook(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> None:
        """Set codebook rows (all, or the ``dead`` ones) to random encoder outputs of this batch."""
        with torch.no_grad():
            h = self.model.encode_moments(x).float()
            vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            weight = self.model.quantize.embedding.weight
            rows = torch.arange(weight.shape[0]) if dead is None else dead.nonzero().flatten().cpu()
            if len(rows) == 0:
                return
            pick = torch.randint(0, vectors.shape[0], (len(rows),), generator=self.gen)
            jitter = torch.randn(len(rows), vectors.shape[1], generator=self.gen).to(vectors.device) * vectors.std() * 0.01
            weight.data[rows.to(weight.device)] = (vectors[pick.to(vectors.device)] + jitter).to(weight.device, weight.dtype)
            self.last_used[rows.to(self.last_used.device)] = self.step

    def train_step(self, bank: ImageBank, time_used: float = 0.0) -> Progress:
        """One optimizer step; ``time_used`` is the share of ``max_minutes`` spent so far. Loss,
        PSNR and codebook use are read back from the device every ``report_every`` steps (and at
        the last); between those, Progress repeats the last values read."""
        opts, started = self.opts, time.perf_counter()
        x = bank.batch(opts.batch_size, opts.crop, opts.min_scale, self.gen).to(self.device)
        x = x.contiguous(memory_format=self.memory_format)
        if not self.codebook_ready:
            self._seed_codebook(x)
            self.codebook_ready = True
        lr = learning_rate(self.step, opts, time_used)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        noise_gen = torch.Generator(device=self.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            recon, reg, indices = self.model(x, sample=True, generator=noise_gen)
        recon = recon.float()
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        weight = opts.kl_weight if self.config.kind == "kl" else opts.vq_weight
        loss = rec_loss + weight * reg.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        _update_ema(self.ema, self.model, self.step, opts.ema_decay)
        self.step += 1

        report = self.step % max(1, opts.report_every) == 0 or self.step >= opts.steps or time_used >= 1.0
        if indices is not None:
            self.last_used[indices.flatten().to(self.last_used.device)] = self.step
            dead = (self.step - self.last_used) > opts.dead_code_steps
            if report:
                self.reported["codes_used"] = 1.0 - float(dead.float().mean())
            if self.step % 10 == 0 and bool(dead.any()):
                self._seed_codebook(x, dead)
        if report:
            self.reported["loss"], self.reported["psnr"] = loss.item(), psnr(recon.detach(), x)
        return Progress(
            step=self.step,
            steps=opts.steps,
            loss=self.reported["loss"],
            psnr=self.reported["psnr"],
            lr=lr,
            seconds=time.perf_counter() - started,
            codes_used=self.reported["codes_used"],
        )

    def finished_model(self, bank: ImageBank) -> AutoEncoder:
        """The EMA model, with the latent scale and shift measured on the training images (KL; a
        fine-tuned model keeps those of the weights it started from)."""
        model = copy.deepcopy(self.ema).cpu().eval()
        if self.config.kind == "kl" and not self.fine_tuned:
            gen = torch.Generator().manual_seed(self.opts.seed + 1)
            with torch.no_grad():  # on the training device, in float32
                z = torch.cat([self.ema.encode(bank.batch(16, self.opts.crop, self.opts.min_scale, gen).to(self.device)).float().cpu() for _ in range(8)])
            mean, std = float(z.mean()), float(z.std())
            model.config = self.config.replace(shift_factor=round(mean, 6), scale_factor=round(1.0 / std, 6))
        model.invalidate_identity()
        return model


def train(
    data: Sequence[Path],
    output: Path,
    config: AutoEncoderConfig,
    opts: TrainOptions,
    *,
    device: torch.device,
    val: Sequence[Path] = (),
    checkpoint: Path | None = None,
    resume: bool = False,
    resume_changes: dict | None = None,
    until: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    max_side: int | None = None,
    init: dict | None = None,
) -> AutoEncoder | None:
    """Train and save the EMA model to ``output``; checkpoints go to ``checkpoint`` (resumable).

    With ``resume`` the run continues from ``checkpoint`` with its own options, except those in
    ``resume_changes`` (``steps``, ``crop``, ``batch_size``, ``max_minutes``; by default
    ``opts.steps``). With ``until`` the run stops after that step, leaving only the checkpoint
    (returns None): a recipe in phases is a series of such runs. With ``opts.max_minutes`` the run
    also ends when that much time has passed since its start, and then saves the model as at its
    last step. ``max_side`` shrinks larger training images when they are read. ``init`` (a state
    dict of ``config``'s architecture) starts a new run from those weights.
    """
    checkpoint = checkpoint or output.with_name(output.name + ".ckpt")
    if resume:
        if not checkpoint.exists():
            raise UsageError(f"--resume: no checkpoint at {checkpoint}")
        trainer = Trainer.resume(checkpoint, device, **(resume_changes or {"steps": opts.steps}))
    else:
        trainer = Trainer(config, opts, device, init)
    if device.type == "cuda":  # fixed crop sizes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bank = ImageBank(data, device=device, max_side=max_side)
    val_images = [load_image(p) for p in val]
    opts = trainer.opts
    last_step = opts.steps if until is None else min(until, opts.steps)
    budget = opts.max_minutes * 60.0 if opts.max_minutes else None
    started = time.monotonic()
    out_of_time = False
    while trainer.step < last_step:
        time_used = (time.monotonic() - started) / budget if budget else 0.0
        progress = trainer.train_step(bank, min(time_used, 1.0))
        out_of_time = budget is not None and time.monotonic() - started >= budget
        if val_images and (trainer.step % opts.val_every == 0 or trainer.step == opts.steps or out_of_time):
            progress.val_psnr = validate(trainer.ema, val_images)
        if trainer.step % opts.checkpoint_every == 0 or trainer.step == last_step or out_of_time:
            trainer.save_checkpoint(checkpoint)
        if on_progress is not None:
            on_progress(progress)
        if out_of_time:
            break
    if trainer.step < opts.steps and not out_of_time:
        return None
    model = trainer.finished_model(bank)
    save_native(model, output)
    return model


def image_files(paths: Sequence[Path]) -> list[Path]:
    """Image files among ``paths`` (folders walked recursively), sorted for reproducibility; the
    unfinished writes of interrupted runs (temporary names) are not images to train on."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and is_image_path(p) and not p.name.startswith(TMP_PREFIX)
            )
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return found


