"""Many processes for one run: torchrun's ranks, ``--shard I/N`` jobs, and the manifest.

What the computing commands share for it: the options, and ``Scale``, which knows this
process's share, joins the other processes, records the manifest and, at the end, gathers
every process's summary so that rank 0 prints the whole run's and exits with its code. The
work itself is the pipeline's (``vqcli.pipeline.selection.Selection``).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vqcli.cli._app import err_console, shown, signals_held
from vqcli.cli.common import RunReport, last_results, stopped
from vqcli.errors import UsageError
from vqcli.pipeline.results import FileResult, StopRun

ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Do only share I (counted from 0) of N of the inputs, split by size: N jobs with I = 0..N-1 "
        "together do each input exactly once (SLURM: --shard $SLURM_ARRAY_TASK_ID/N). Under torchrun the "
        "ranks split the shard.",
        show_default=False,
    ),
]
ManifestOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--manifest/--no-manifest",
        help="Write OUTPUT/manifest.jsonl, a line per input (source, output, bytes, status, error). Default: on "
        "with --shard, --from-manifest or under torchrun.",
        show_default=False,
    ),
]
FromManifestOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--from-manifest",
        metavar="FILE",
        help="Take the inputs from a manifest instead of INPUT, without walking folders: only its failed lines, "
        "lines without a status and those whose output is gone are done.",
        show_default=False,
    ),
]
TarOutputOpt = Annotated[
    bool,
    typer.Option(
        "--tar-output",
        help="Tar shard inputs: write each shard's latents into one tar, OUTPUT/shard.tar (KEY.jpg -> "
        "KEY.jpg.safetensors), instead of a folder OUTPUT/shard.tar/.",
    ),
]


class Scale:
    """This process's part of a run (one process, a torchrun rank, a ``--shard`` job)."""

    def __init__(
        self,
        inputs: Sequence[Path] | None,
        output: Path,
        *,
        shard: str | None = None,
        manifest: bool | None = None,
        from_manifest: Path | None = None,
    ):
        from vqcli.pipeline import distributed, shards
        from vqcli.pipeline.jobs import check_inputs

        self.output = output
        self.ctx = distributed.context_from_env()
        self.outer = shards.parse_shard(shard) if shard is not None else None
        self.from_manifest = from_manifest
        if from_manifest is not None:
            if inputs:
                raise UsageError("give either INPUT... or --from-manifest, not both")
            if not from_manifest.is_file():
                raise UsageError(f"{from_manifest}: no such manifest file")
            check_inputs([from_manifest], output)
        else:
            check_inputs(list(inputs or []), output)
        self.share = shards.combine(self.outer, self.ctx.rank, self.ctx.world)
        self.record = manifest if manifest is not None else (self.share is not None or from_manifest is not None)
        if self.record:
            from vqcli.io.manifest import check_existing

            check_existing(output)  # one this run could not update is refused before any work
        self.manifest_failed = False
        self.digest: str | None = None
        self.recorder = None
        self.merged = None
        self._peers: list[tuple[str, int]] = []  # (host, pid) of the other processes

    @property
    def main(self) -> bool:
        return self.ctx.main

    def start(self, device):
        """Join the other processes; this process's device (``cuda`` -> ``cuda:LOCAL_RANK``) and threads."""
        from vqcli.pipeline import distributed

        distributed.start(self.ctx)
        distributed.split_threads(self.ctx)
        return distributed.place(self.ctx, device)

    def selection(self):
        from vqcli.io.manifest import read_entries
        from vqcli.pipeline.selection import Selection

        entries = (lambda: read_entries(self.from_manifest)) if self.from_manifest is not None else None
        return Selection(share=self.share, entries=entries, listed=self._listed)

    def _listed(self, digest: str, count: int) -> None:
        from vqcli.pipeline import distributed

        self.digest = digest
        distributed.check_same(
            self.ctx,
            digest,
            "the processes found different inputs (folders that differ between nodes, or files changing while "
            "they were listed), so their shares would not fit together",
        )

    def same(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (a choice that must be the same everywhere, such
        as the dtype ``--dtype auto`` measures)."""
        from vqcli.pipeline import distributed

        return distributed.from_main(self.ctx, value) if self.ctx.active else value

    def seed(self, sample: bool, seed: int | None) -> int | None:
        """The seed of ``--sample``: one for all processes (rank 0's draw when none is given)."""
        from vqcli.pipeline import distributed

        if not sample or seed is not None:
            return seed
        if self.outer is not None:
            raise UsageError("--sample with --shard needs --seed, so that all shards draw with the same seed")
        return distributed.from_main(self.ctx, secrets.randbits(62)) if self.ctx.active else None

    def max_memory(self, budget: int | None, device) -> int | None:
        """--max-memory's default, shared among the processes that share this machine's memory."""
        if budget is not None or self.ctx.local_world == 1 or device.type != "cpu":
            return budget
        from vqcli.speed.budget import default_budget

        return max(1, default_budget(device) // self.ctx.local_world)

    def report(self, command: str, *, quiet: bool, as_json: bool, **kw) -> RunReport:
        """The run report: progress and summary on rank 0 only; failures on each process's stderr."""
        main = self.ctx.main
        extra = dict(kw.pop("extra", None) or {})
        if self.outer is not None:
            extra["shard"] = str(self.outer)
        if self.ctx.active:
            extra["processes"] = self.ctx.world
        return RunReport(command, quiet=quiet or not main, as_json=as_json and main, extra=extra, **kw)

    def begin(self) -> None:
        """Start this process's part of the manifest, when there is one (even if it stays empty)."""
        if self.record:
            from vqcli.io.manifest import Recorder

            share = self.share
            where = (share.index, share.count, share.rank, share.world) if share is not None else (0, 1, 0, 1)
            self.recorder = Recorder(self.output, *where)

    def add(self, report: RunReport, result: FileResult) -> None:
        """Count ``result`` in ``report`` and record it in the manifest when there is one."""
        if self.recorder is not None:
            from vqcli.pipeline.sources import entry_of

            self.recorder.add(entry_of(result, self.output))
        report.add(result)

    def finish_manifest(self) -> None:
        """Put this process's part of the manifest in place (and merge, if it is the last)."""
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        try:
            self.merged = recorder.finish(self.digest)
        except OSError as e:
            self.manifest_failed = True
            err_console.print(shown(f"cannot write the manifest in {self.output} ({e.strerror or e})"), style="red")

    def finish(
        self,
        report: RunReport,
        gather: Callable[[], Any] | None = None,
        combine: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """End of the run: the manifest, then (several processes) every process's summary into
        ``report``; ``gather()``'s value of every process goes to ``combine`` (e.g. per-image rows)."""
        from vqcli.pipeline import distributed

        self.finish_manifest()
        states = [self._state(report, gather)]
        if self.ctx.active and not report.interrupted:
            states = distributed.all_gather(self.ctx, states[0])
            self._combine(report, states)
        if combine is not None and gather is not None and len(states) > 1:
            combine([s["extra"] for s in states])
        merges = [s["manifest"] for s in states if s["manifest"] is not None]
        if merges:
            self._tell_manifest(report, merges)

    def _tell_manifest(self, report: RunReport, merges: list[dict]) -> None:
        path = self.output / "manifest.jsonl"
        done = next((m for m in merges if m["merged"]), None)
        info = done or min(merges, key=lambda m: len(m["missing"]))
        report.extra["manifest"] = {
            "path": str(path),
            "merged": done is not None,
            "lines": info["lines"],
            "waiting_for_parts": info["missing"],
        }
        if self.ctx.main:
            for warning in sorted({m["warning"] for m in merges if m["warning"]}):
                err_console.print(shown(f"warning: {warning}"), style="yellow", highlight=False)
        if report.quiet or report.as_json:
            return
        if done is not None:
            err_console.print(shown(f"manifest: {path} ({done['lines']} lines)"), highlight=False, soft_wrap=True)
        else:
            waiting = ", ".join(map(str, info["missing"]))
            err_console.print(
                shown(
                    f"manifest part {self.share} written; {path} is made when all {self.share.count:,} parts are "
                    f"there (waiting for: {waiting})"
                ),
                highlight=False,
                soft_wrap=True,  # (one line in a log, however long the path)
            )

    def exit_code(self, report: RunReport, code: int) -> int:
        """The code this process exits with, once rank 0 has printed the summary.

        Rank 0 carries the whole run's code; another rank whose own work ended normally exits 0
        even when inputs failed elsewhere. So torchrun, which stops the other processes as soon
        as one exits with an error, never stops rank 0 before its summary is out, and reports a
        run with failed inputs once, as rank 0's exit code 1 (torchrun's own exit code).
        """
        from vqcli.cli._app import EXIT_OK, EXIT_SOME_FAILED

        if self.manifest_failed and code == EXIT_OK:
            code = EXIT_SOME_FAILED  # the outputs are there, but what the run was asked to record is not
        if not self.ctx.active or report.interrupted:
            return code
        import sys

        from vqcli.pipeline import distributed

        sys.stdout.flush()
        sys.stderr.flush()
        distributed.barrier(self.ctx)
        if not self.ctx.main:
            return EXIT_OK if code == EXIT_SOME_FAILED else code
        if code != EXIT_OK:  # let this node's other ranks end first: torchrun would stop them
            distributed.wait_for_exit([p for host, p in self._peers if host == socket.gethostname()], 10.0)
        return code

    def _state(self, report: RunReport, gather) -> dict:
        m = self.merged
        return {
            "rank": self.ctx.rank,
            "process": (socket.gethostname(), os.getpid()),
            "device": report.extra.get("device"),
            "counts": dict(report.counts),
            "failures": list(report.failures),
            "fallbacks": report.fallbacks,
            "seconds": round(report.seconds, 3),
            "extra": gather() if gather is not None else None,
            "manifest": None if m is None else {"merged": m.merged, "missing": m.missing, "warning": m.warning, "lines": m.lines},
        }

    def _combine(self, report: RunReport, states: list[dict]) -> None:
        self._peers = [s["process"] for s in states if s["rank"] != self.ctx.rank]
        report.counts = {k: sum(s["counts"][k] for s in states) for k in report.counts}
        report.failures = [f for s in states for f in s["failures"]]
        report.fallbacks = sum(s["fallbacks"] for s in states)
        report.extra["ranks"] = [
            {"rank": s["rank"], "device": s["device"], **s["counts"], "seconds": s["seconds"]} for s in states
        ]


def run(report: RunReport, results: Iterable[FileResult], scale: Scale, **finish: Any) -> None:
    """Feed ``results`` into ``report`` (recording the manifest), finish the run across processes,
    print the summary and exit with the whole run's code (rank 0; see ``Scale.exit_code``).

    Ctrl-C stops the run between files: what was finished stays finished and is in the manifest
    (each result is counted with the signals held: ``signals_held``).
    The heap is tuned for the run (``speed.heap.fast_allocator``): it stays paged in between files.
    """
    from vqcli.pipeline import distributed
    from vqcli.speed.heap import fast_allocator

    result = counted = None
    try:
        try:
            with report, fast_allocator():
                scale.begin()
                for result in results:
                    with signals_held():  # (a stop here would lose a file already written)
                        scale.add(report, result)
                        counted = result
        except KeyboardInterrupt:
            report.interrupted = True
            if result is not counted:  # the stop came between receiving it and counting it
                scale.add(report, result)
            for result in last_results(results):
                scale.add(report, result)
        except StopRun as e:
            stopped(report, e)
        except BaseException:
            scale.finish_manifest()
            raise
        scale.finish(report, **finish)
        code = scale.exit_code(report, report.finish())
    finally:
        distributed.stop(scale.ctx)
    raise typer.Exit(code)
