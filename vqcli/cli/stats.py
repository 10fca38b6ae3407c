"""``vqcli stats``: per-channel mean and std of a set of latents, and the scale and shift factors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vqcli.cli._app import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    app,
    err_console,
    fail,
    handle_errors,
    json_result,
    out_console,
    shown,
)
from vqcli.cli.common import JsonOpt, epilog, help_text
from vqcli.cli.scale import ShardOpt

HELP = help_text(
    """
    Per-channel mean and standard deviation of the latents in LATENT files and folders, and the
    scale_factor (1 / std) and shift_factor (mean) to give a diffusion model trained on them: per
    channel and over all channels together (the single numbers SD3 and FLUX publish).

    Streamed, one file at a time, in float64 with pairwise (Chan) updates. Scaled latents are
    unscaled with their own factors first, so the numbers are those of the model's raw latents.

    Many processes: under torchrun the ranks split the files and merge their sums; --shard I/N
    does one share, and its --json output (the 'partial' field holds the sums) can be given back
    as an input: 'vqcli stats part0.json part1.json' merges the shares exactly.
    """
)


@app.command(
    help=HELP,
    epilog=epilog(
        "vqcli stats latents/",
        "vqcli stats latents/ --json > stats.json",
        "vqcli stats latents/ --shard $SLURM_ARRAY_TASK_ID/8 --json > part$SLURM_ARRAY_TASK_ID.json",
        "vqcli stats part*.json",
    ),
)
@handle_errors
def stats(
    inputs: Annotated[list[Path], typer.Argument(metavar="LATENT...", help="Latent files, folders of them (walked recursively) and partial results (.json) to merge.", show_default=False)],
    shard: ShardOpt = None,
    as_json: JsonOpt = False,
) -> None:
    from vqcli.pipeline import distributed, shards
    from vqcli.pipeline.jobs import is_latent_path, walk
    from vqcli.pipeline.results import FileResult
    from vqcli.pipeline.stats import ChannelStats, accumulate

    ctx = distributed.context_from_env()
    share = shards.combine(shards.parse_shard(shard) if shard is not None else None, ctx.rank, ctx.world)
    total = ChannelStats()
    failures: list[str] = []
    files: list[Path] = []
    for found in walk(inputs, lambda n: is_latent_path(n) or n.endswith(".json")):
        if isinstance(found, FileResult):
            failures.append(found.message)
        elif found[0].suffix.lower() == ".json":
            if ctx.main and (share is None or share.index == 0):  # a partial is merged once
                failures.extend(_merge_partial(total, found[0]))
        else:
            files.append(found[0])
    if share is not None:
        files = files[share.index :: share.count][share.rank :: share.world]  # the shard's, then this rank's part
    distributed.start(ctx)
    try:
        for path, reason in accumulate(files, total):
            if reason is not None:
                failures.append(f"{path}: {reason}")
        if ctx.active:
            states = distributed.all_gather(ctx, (total.state(), failures))
            total, failures = ChannelStats(), [f for _, fs in states for f in fs]
            for state, _ in states:
                total.merge(ChannelStats.from_state(state))
    finally:
        distributed.stop(ctx)
    if not ctx.main:
        raise typer.Exit(EXIT_OK)
    _report(total, failures, share, as_json)


def _merge_partial(total, path: Path) -> list[str]:
    from vqcli.errors import FileError
    from vqcli.pipeline.stats import ChannelStats

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        partial = ChannelStats.from_state(data.get("partial") if isinstance(data, dict) else None, path)
        total.merge(partial)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{path}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})"]
    except FileError as e:
        return [str(e)]
    except ValueError as e:
        return [f"{path}: {e}"]
    return []


def _report(total, failures: list[str], share, as_json: bool) -> None:
    for message in failures:
        err_console.print(shown(message), style="red", highlight=False, soft_wrap=True)
    if total.channels == 0:
        raise fail("no latent values to measure (no KL latent files among the inputs)", EXIT_SOME_FAILED if failures else 2)
    summary = total.summary()
    if as_json:
        body = json_result("stats", not failures, **summary, failed=len(failures), partial=total.state())
        if share is not None:
            body["shard"] = str(share)
        print(json.dumps(body))
    else:
        from rich.table import Table

        table = Table(title=f"{summary['files']} latent files, {summary['values_per_channel']} values per channel")
        for column in ("channel", "mean", "std", "scale_factor", "shift_factor"):
            table.add_column(column, justify="right")
        for c in range(summary["channels"]):
            scale = summary["scale_factor"][c]
            table.add_row(str(c), f"{summary['mean'][c]:.6g}", f"{summary['std'][c]:.6g}", "-" if scale is None else f"{scale:.6g}", f"{summary['mean'][c]:.6g}")
        o = summary["overall"]
        scale = "-" if o["scale_factor"] is None else f"{o['scale_factor']:.6g}"
        table.add_row("all", f"{o['mean']:.6g}", f"{o['std']:.6g}", scale, f"{o['mean']:.6g}")
        out_console.print(table)
    raise typer.Exit(EXIT_SOME_FAILED if failures else EXIT_OK)
