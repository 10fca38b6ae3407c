"""``vqcli train``: train an autoencoder on a folder of images."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vqcli.cli._app import (
    EXIT_INTERRUPTED,
    EXIT_SOME_FAILED,
    app,
    err_console,
    fail,
    handle_errors,
    print_json,
    shown,
)
from vqcli.errors import first_line


def _parse_mult(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter("every multiplier must be a positive integer")
    return values


def _interrupted(output: Path, last: dict, first_step: list[int], every: int) -> str:
    """What an interrupted run leaves: the step it reached and the step its checkpoint holds."""
    if "step" not in last:
        return "interrupted before the first step; nothing saved"
    step = last["step"]
    saved = max(step // every * every, first_step[0])  # checkpoints are written before progress is reported
    if saved == 0:
        return f"interrupted at step {step}, before the first checkpoint (every {every} steps); nothing saved"
    ckpt = output.with_name(output.name + ".ckpt")
    return f"interrupted at step {step}; the checkpoint {ckpt} holds step {saved}: continue with --resume"


@app.command(
    epilog="Example: vqcli train photos/ --val val_photos/ --preset default --steps 4000 -o my-model.safetensors"
)
@handle_errors
def train(
    data: list[Path] = typer.Argument(..., help="Image files or folders to train on (walked recursively)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trained model (.safetensors)."),
    val: list[Path] = typer.Option([], "--val", help="Validation images or folders; their PSNR is reported."),
    preset: Optional[str] = typer.Option(None, help="Architecture preset: default (KL f4) or default-vq (VQ f4)."),
    init: Optional[str] = typer.Option(
        None, "--init", help="Start from these weights (a file, a folder or an embedded name) and their architecture: fine-tuning."
    ),
    kind: Optional[str] = typer.Option(None, help="kl or vq (overrides the preset)."),
    ch: Optional[int] = typer.Option(None, help="Base channels, a multiple of 32."),
    ch_mult: Optional[str] = typer.Option(None, "--ch-mult", help="Channel multipliers per level, e.g. 1,2,4,4."),
    num_res_blocks: Optional[int] = typer.Option(None, "--num-res-blocks", min=1, help="Residual blocks per level (default: the base model's)."),
    z_channels: Optional[int] = typer.Option(None, "--z-channels", min=1, help="Latent channels (default: the base model's)."),
    codebook_size: Optional[int] = typer.Option(None, "--codebook-size", min=2, help="VQ codebook entries."),
    mid_attention: Optional[bool] = typer.Option(
        None, "--mid-attention/--no-mid-attention", help="The middle attention block [default: the preset's]."
    ),
    steps: int = typer.Option(4000, min=1, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Crops per step [default: 16]."),
    crop: Optional[int] = typer.Option(None, min=8, help="Crop side in pixels [default: 64]."),
    lr: float = typer.Option(4e-4, help="Peak learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(0, help="Random seed: the same seed and options give the same model."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    bf16: Optional[bool] = typer.Option(
        None, "--bf16/--no-bf16", help="bfloat16 autocast (default: on for CUDA and for CPUs with native bf16)."
    ),
    until: Optional[int] = typer.Option(
        None, "--until", min=1, help="Stop after this step, leaving the checkpoint to --resume from (phased recipes)."
    ),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes", min=0.0, help="Wall-clock limit: the schedule follows the time used; at the limit the model is saved."
    ),
    max_side: Optional[int] = typer.Option(
        None, "--max-side", min=16, help="Shrink training images larger than this on their long side when read."
    ),
    ema_decay: float = typer.Option(0.999, "--ema-decay", min=0.0, max=1.0, help="Decay of the weights' moving average."),
    warmup: int = typer.Option(200, "--warmup", min=1, help="Linear warm-up steps."),
    report_every: Optional[int] = typer.Option(
        None, "--report-every", min=1, help="Steps between read-backs of loss and PSNR [default: 1; 25 on CUDA]."
    ),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", min=1, help="Steps between the checkpoints --resume continues from (OUTPUT.ckpt)."),
    val_every: int = typer.Option(500, "--val-every", min=1, help="Steps between measurements of the validation PSNR."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT.ckpt, written every --checkpoint-every steps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train an autoencoder of this family and save its EMA weights.

    Random crops, flips, rescales and channel permutations of the training images; L1 + MSE loss
    (+ KL or codebook terms); AdamW with warm-up and cosine decay; checkpoints every
    --checkpoint-every steps, resumable with --resume. --init fine-tunes weights you already have
    (a file, a diffusers folder or an embedded name), keeping their latent scale and shift.
    """
    from vqcli.errors import ConfigError
    from vqcli.io.ownership import check_replaceable
    from vqcli.model.config import AutoEncoderConfig
    from vqcli.speed.devices import cpu_has_native_bf16, resolve_device
    from vqcli.train import TRAIN_PRESETS, TrainOptions, image_files
    from vqcli.train import train as run_training

    # (a resumed run replaces the output it may have written before: vqcli's own only)
    check_replaceable(output, overwrite=overwrite or resume)
    if preset is not None and preset not in TRAIN_PRESETS:
        raise fail(f"unknown --preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)}")
    base = TRAIN_PRESETS[preset or "default"]
    changes = {
        k: v
        for k, v in dict(
            kind=kind,
            ch=ch,
            ch_mult=_parse_mult(ch_mult) if ch_mult else None,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            n_embed=codebook_size,
            mid_attention=mid_attention,
        ).items()
        if v is not None
    }
    init_weights = None
    if init is not None:
        if resume:
            raise fail("--init starts a run and --resume continues one: give one of them")
        if preset is not None or changes:
            raise fail("--init trains the architecture of its weights: leave out --preset and the architecture options")
        from vqcli.checkpoints.load import resolve_model

        start = resolve_model(init, option="--init")
        base, init_weights = start.config, start.state_dict()
    if kind is not None and kind not in ("kl", "vq"):
        raise fail(f"--kind must be kl or vq, not {kind!r}")
    if changes.get("kind") == "vq" and base.kind != "vq":
        changes.setdefault("n_embed", 1024)
    if changes.get("kind") == "kl" and base.kind != "kl":
        changes["n_embed"] = 0
    if changes:
        changes.setdefault("embed_dim", changes.get("z_channels", base.z_channels))
        changes["double_z"] = None
        changes["name"] = output.stem
    try:
        config = AutoEncoderConfig(**{**base.to_dict(), **changes})
    except ConfigError as e:  # options that make no model are a usage error
        raise fail(str(e)) from None

    torch_device = resolve_device(device)
    use_bf16 = bf16 if bf16 is not None else (torch_device.type == "cuda" or (torch_device.type == "cpu" and cpu_has_native_bf16()))
    opts = TrainOptions(
        steps=steps,
        batch_size=batch_size or TrainOptions.batch_size,
        crop=crop or TrainOptions.crop,
        lr=lr,
        seed=seed,
        bf16=use_bf16,
        checkpoint_every=checkpoint_every,
        val_every=val_every,
        max_minutes=max_minutes,
        ema_decay=ema_decay,
        warmup=warmup,
        report_every=report_every or (25 if torch_device.type == "cuda" else 1),
    )
    files = image_files(data)
    val_files = image_files(val) if val else []
    if not files:
        raise fail("no training images found in " + ", ".join(map(str, data)))

    last: dict = {}
    started = time.perf_counter()
    log_every = max(1, steps // 200)
    first_step: list[int] = []  # the step a resumed run started from, for the ETA
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}  psnr {task.fields[psnr]:.2f} dB  {task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, disable=quiet or not err_console.is_terminal) as bar:
        task = bar.add_task("train", total=steps, loss=0.0, psnr=0.0, extra="")

        def on_progress(p) -> None:
            last["step"], last["loss"], last["psnr"] = p.step, p.loss, p.psnr
            extra = []
            if p.val_psnr is not None:
                last["val_psnr"] = p.val_psnr
            if "val_psnr" in last:
                extra.append(f"val {last['val_psnr']:.2f} dB")
            if p.codes_used is not None:
                last["codes_used"] = p.codes_used
                extra.append(f"codes {100 * p.codes_used:.0f}%")
            if not first_step:
                first_step.append(p.step - 1)
            bar.update(task, completed=p.step, loss=p.loss, psnr=p.psnr, extra="  ".join(extra))
            elapsed = time.perf_counter() - started
            if max_minutes:  # bounded by time: a line every 15 seconds, and at the end
                due = elapsed - last.get("logged", -1e9) >= 15.0 or p.step == steps
            else:
                due = p.step % log_every == 0 or p.step == steps
            if not quiet and not err_console.is_terminal and due:
                # Not a terminal (a log file, CI): a plain line now and then instead of a live bar.
                last["logged"] = elapsed
                eta = elapsed / max(1, p.step - first_step[0]) * (steps - p.step)
                if max_minutes:
                    eta = min(eta, max(0.0, 60.0 * max_minutes - elapsed))
                err_console.print(
                    f"step {p.step}/{steps}  loss {p.loss:.4f}  psnr {p.psnr:.2f} dB  {'  '.join(extra)}  "
                    f"{elapsed:.0f}s elapsed, eta {eta:.0f}s",
                    highlight=False,
                    soft_wrap=True,
                )

        try:
            model = run_training(
                files, output, config, opts, device=torch_device, val=val_files,
                resume=resume, resume_changes=dict(steps=steps, crop=crop, batch_size=batch_size, max_minutes=max_minutes),
                until=until, on_progress=on_progress, max_side=max_side, init=init_weights,
            )
        except KeyboardInterrupt:
            bar.stop()
            err_console.print(shown(_interrupted(output, last, first_step, checkpoint_every)), highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e) or os.environ.get("VQCLI_DEBUG"):
                raise
            bar.stop()
            raise fail(
                f"not enough memory to train this model at these sizes (--ch {config.ch}, --crop {opts.crop}, "
                f"--batch-size {opts.batch_size}): {_allocation(e)}",
                EXIT_SOME_FAILED,
            ) from None
    if model is None:
        err_console.print(f"stopped after step {last.get('step')}; continue with --resume")
        return
    if last.get("step", steps) < steps:
        err_console.print(
            f"--max-minutes {max_minutes:g} reached at step {last.get('step')} (loss {last.get('loss', math.nan):.4f}, "
            f"psnr {last.get('psnr', math.nan):.2f} dB); saved the model as at a last step",
            highlight=False,
            soft_wrap=True,
        )
    summary = {
        "output": str(output),
        "config": model.config.to_dict(),
        "steps": last.get("step"),
        "loss": last.get("loss"),
        "train_psnr": last.get("psnr"),
        "val_psnr": last.get("val_psnr"),
        "codes_used": last.get("codes_used"),
        "bf16": use_bf16,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if as_json:
        print_json("train", True, summary)
    elif not quiet:
        val_text = f", validation PSNR {summary['val_psnr']:.2f} dB" if summary["val_psnr"] is not None else ""
        err_console.print(f"saved {shown(output)} after {summary['steps']} steps{val_text}", highlight=False, soft_wrap=True)


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed (the allocator's RuntimeError, or Python's MemoryError)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return any(w in text for w in ("can't allocate", "cannot allocate", "out of memory", "not enough memory"))


def _allocation(e: BaseException) -> str:
    """What the allocator could not give, in a few words."""
    import re

    m = re.search(r"tried to allocate (\d+) bytes", str(e))
    if m:
        return f"one allocation of {int(m.group(1)) / 2**30:,.1f} GiB failed"
    return first_line(e)[:160] or type(e).__name__
