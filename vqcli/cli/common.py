"""What the computing commands share: their options, and the run report (progress, failures, summary).

The report has three modes: people (a progress bar and failures on stderr, a summary line on
stdout), ``--quiet`` (failures only) and ``--json`` (one JSON object on stdout at the end).
Failures are printed once each, as ``path: reason``, as they happen.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from vqcli.cli._app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    err_console,
    out_console,
    print_json,
    shown,
    signals_held,
)
from vqcli.errors import UsageError
from vqcli.pipeline.results import DONE, FAILED, SKIPPED, FileResult, StopRun

# --- options --------------------------------------------------------------------------------------

MODEL_HELP = (
    "The model: 'default' (embedded KL model), 'default-vq' (embedded VQ model), a weights file or folder, or "
    "ORG/NAME[@REVISION] from the local Hugging Face cache (offline; a pipeline's vae/ folder by default)."
)
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
OptionalModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="The model; by default the one each latent file names (embedded models only)."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps.")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Compute precision: float32, bfloat16 (CUDA, or CPUs with native bf16), float16 (GPU only), or auto: "
        "the fastest of these whose output on a check image stays within 40 dB PSNR of float32.",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images of equal size computed together.")]
SubfolderOpt = Annotated[
    Optional[str],
    typer.Option("--subfolder", help="With --model ORG/NAME: the folder of the snapshot that holds the autoencoder."),
]
PresetOpt = Annotated[
    Optional[str], typer.Option("--preset", help="Architecture preset, for checkpoints that do not describe themselves.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that exist (vqcli's own only).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary; failures only.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
PROGRESS_MODES = ("auto", "bar", "lines", "none")
ProgressOpt = Annotated[
    str,
    typer.Option(
        "--progress",
        parser=lambda text: _progress_mode(text),
        metavar="auto|bar|lines|none",
        help="auto: a bar on a terminal; else, once a run is 30 s old, a plain line every 30 s or 10% (logs: SLURM, nohup); "
        "bar, lines or none.",
    ),
]


def _progress_mode(text: str) -> str:
    if text not in PROGRESS_MODES:
        raise typer.BadParameter(f"{text!r}: use {', '.join(PROGRESS_MODES)}")
    return text


PROGRESS_SECONDS = 30.0  # with --progress lines: a line at least this often (as results come in)
PROGRESS_AFTER = 30.0  # ... once the run is this old: a short run's log has its summary only
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the model, for GPUs: on CPUs it measured slower than without (README, Speed). The "
        "first image of each size compiles, a minute or more; needs a C++ compiler on CPUs.",
    ),
]
IoThreadsOpt = Annotated[
    int,
    typer.Option(
        "--io-threads",
        min=0,
        help="Threads that read files ahead of the model, plus one that writes behind it (0: read and write "
        "in turn with the model).",
    ),
]
MaxMemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="Memory for the model's working data, e.g. 4GB (default: a quarter of the memory free at the "
        "start). What does not fit is computed in bands, with the same result (large intermediate maps go to "
        "temporary files in TMPDIR).",
    ),
]


def parse_max_memory(text: str | None) -> int | None:
    """--max-memory to bytes (a ``UsageError`` for a value that is not a size)."""
    from vqcli.errors import UsageError
    from vqcli.speed.budget import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None


MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        min=0,
        help="Refuse images larger than this many pixels (decompression bombs); 0: no limit.",
    ),
]


def setup_device(device: str, dtype: str):
    """Parse --device and --dtype (a ``UsageError`` naming what is wrong)."""
    from vqcli.speed.devices import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    return torch_device, resolve_dtype(dtype, torch_device)


def settle_dtype(model, device, dtype):
    """The dtype to compute ``model`` in: ``dtype`` as given, or for ``--dtype auto`` (None) the one
    ``accel.choose_dtype`` measures as fastest within 40 dB of float32, said on stderr."""
    from vqcli.speed.precision import choose_dtype

    if dtype is not None:
        return dtype
    choice = choose_dtype(model, device)
    err_console.print(choice.describe(), highlight=False)
    return choice.dtype


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the run report -------------------------------------------------------------------------------


def left_out_of(inputs, output, what: str, *, latents: bool = False):
    """``RunReport``'s ``left_out`` for a run over ``inputs`` (None when none were named): the files
    of the folders named whose names are not those of ``what``."""
    if not inputs:
        return None

    def left_out() -> tuple[list[str], int]:
        from vqcli.io.images import is_image_path
        from vqcli.io.tarfiles import is_tar_path
        from vqcli.pipeline.jobs import is_latent_path, not_taken

        accept = is_latent_path if latents else (lambda name: is_image_path(name) or is_tar_path(name))
        found, count = not_taken(inputs, accept, exclude=output)
        return [f"{p}: left out: not named as {what} ({p.suffix or 'no extension'})" for p in found], count

    return left_out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _RateColumn(ProgressColumn):
    """Images per second over the whole run."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.2f} img/s", style="progress.data.speed")


class RunReport:
    """Collects per-file results of one run and shows them as the user asked.

    Use as a context manager around the loop; ``add`` each result; ``finish`` prints the summary
    and returns the exit code.
    """

    def __init__(
        self,
        command: str,
        *,
        verb: str,
        count: Callable[[], int] | None = None,
        quiet: bool = False,
        as_json: bool = False,
        extra: dict[str, Any] | None = None,
        progress: str = "auto",
        left_out: Callable[[], tuple[list[str], int]] | None = None,
    ):
        """``count`` gives the number of inputs; called only when progress is shown, since counting
        walks the inputs once more. ``progress``: ``auto`` (a bar when stderr is a terminal, else
        lines), ``bar``, ``lines`` (a plain line every ``PROGRESS_SECONDS`` or 10% of the inputs)
        or ``none``. ``left_out`` gives, when nothing was found to do, the files of the folders
        named that were left out (``path: why`` lines, the first few, and how many in all); when
        there are some the run fails (exit 1): the user named files that gave nothing (an empty
        folder is only nothing to do)."""
        if progress not in PROGRESS_MODES:
            raise UsageError(f"--progress {progress!r}: use {', '.join(PROGRESS_MODES)}")
        if progress == "auto":
            progress = "bar" if err_console.is_terminal else "lines"
        self.command, self.verb = command, verb
        self.quiet, self.as_json = quiet, as_json
        self.lines = progress == "lines" and not quiet
        self.left_out = left_out
        self.found_nothing = False
        self.extra: dict[str, Any] = dict(extra or {})
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.failures: list[dict[str, str]] = []
        self.fallbacks = 0
        self.interrupted = False
        self.started = time.perf_counter()
        shows = progress == "lines" or (progress == "bar" and err_console.is_terminal)
        self.total = count() if (count is not None and not quiet and shows) else None
        self._last_line = (self.started, 0)  # (when, how many done) at the last progress line
        show = progress == "bar" and self.total is not None and self.total > 1
        self._progress = (
            Progress(
                TextColumn(f"[bold]{command}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            if show
            else None
        )
        self._task = None

    def __enter__(self) -> "RunReport":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.command, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, result: FileResult) -> None:
        self.counts[result.status] += 1
        self.fallbacks += int(result.fallback_fp32)
        if result.status == FAILED:
            self.failures.append({"path": str(result.input), "reason": result.reason})
            # shown: file names may hold [brackets], escapes, newlines; soft wrap: one line, whatever the width
            err_console.print(shown(result.message), highlight=False, soft_wrap=True, style="red")
        elif result.info.get("note") and not self.quiet:
            err_console.print(f"{shown(result.input)}: {shown(result.info['note'])}", highlight=False, soft_wrap=True)
        if self._progress is not None:
            self._progress.advance(self._task)
        if self.lines:
            self._progress_line()

    def _progress_line(self) -> None:
        """A plain line, for logs, once the run is ``PROGRESS_AFTER`` seconds old: when
        ``PROGRESS_SECONDS`` have passed since the last one, or another tenth of the inputs is done."""
        now, handled = time.perf_counter(), sum(self.counts.values())
        if now - self.started < PROGRESS_AFTER:
            return
        when, before = self._last_line
        tenth = self.total is not None and self.total > 0 and handled * 10 // self.total > before * 10 // self.total
        if not tenth and now - when < PROGRESS_SECONDS:
            return
        self._last_line = (now, handled)
        elapsed = now - self.started
        rate = self.counts[DONE] / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.command}: {handled}/{self.total} ({100 * handled // self.total}%)"
            if rate > 0 and self.total > handled:
                text += f", eta {_duration((self.total - handled) / (handled / elapsed))}"
        else:
            text = f"{self.command}: {handled} files"
        text += f", {rate:.2f} images/s, {_duration(elapsed)} so far"
        if self.counts[FAILED]:
            text += f", {self.counts[FAILED]} failed"
        err_console.print(text, highlight=False, markup=False, soft_wrap=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        seconds = self.seconds
        done = self.counts[DONE]
        return {
            "command": self.command,
            **self.extra,
            "total": sum(self.counts.values()),
            "done": done,
            "skipped": self.counts[SKIPPED],
            "failed": self.counts[FAILED],
            "fp32_fallbacks": self.fallbacks,
            "failures": self.failures,
            "interrupted": self.interrupted,
            "seconds": round(seconds, 3),
            "images_per_second": round(done / seconds, 3) if seconds > 0 else 0.0,
        }

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.found_nothing:
            return EXIT_SOME_FAILED
        return EXIT_SOME_FAILED if self.counts[FAILED] else EXIT_OK

    def finish(self) -> int:
        """Print the summary (JSON on stdout, or one line for people) and return the exit code."""
        s = self.summary()
        if s["total"] == 0 and self.left_out is not None and not self.interrupted:
            lines, count = self.left_out()
            self.found_nothing = count > 0
            for line in lines:
                err_console.print(shown(line), highlight=False, soft_wrap=True, style="red")
            if count > len(lines):
                err_console.print(f"... and {count - len(lines)} more files left out", highlight=False)
            s["left_out"] = count
        if self.as_json:
            print_json(self.command, self.exit_code() == EXIT_OK, {k: v for k, v in s.items() if k != "command"})
        elif not self.quiet:
            parts = [f"{s['done']} {self.verb}"]
            if s["skipped"]:
                parts.append(f"{s['skipped']} skipped (already there)")
            if s["failed"]:
                parts.append(f"{s['failed']} failed")
            if s["fp32_fallbacks"]:
                parts.append(f"{s['fp32_fallbacks']} redone in float32 (NaN/Inf in reduced precision)")
            rate = f" ({s['images_per_second']:.2f} images/s)" if s["done"] else ""
            where = f" -> {shown(self.extra['output'])}" if "output" in self.extra else ""
            text = f"{', '.join(parts)} in {s['seconds']:.1f} s{rate}{where}"
            if self.interrupted:
                text = "interrupted: " + text
            if s["total"] == 0:
                text = "nothing to do: no input files found"
                if self.found_nothing:
                    n = s["left_out"]
                    text += f" ({n} {'file' if n == 1 else 'files'} left out by name)"
            out_console.print(text, highlight=False, soft_wrap=True)
        return self.exit_code()


def last_results(results) -> list:
    """After Ctrl-C reached the caller between two results: the results of the files the stream
    had finished meanwhile (written behind, in a thread), which it gives up when the interrupt is
    thrown into it. Empty when the interrupt was raised inside the stream (it reported them then)."""
    throw = getattr(results, "throw", None)
    found: list = []
    if throw is None:
        return found
    try:
        found.append(throw(KeyboardInterrupt()))
        found.extend(results)
    except (KeyboardInterrupt, StopIteration):
        pass
    return found


def run_report(report: RunReport, results) -> None:
    """Feed ``results`` into ``report``, print the summary and exit with its code.

    Ctrl-C stops the run between files: what was finished stays finished (each file is written
    atomically), the summary says so, and the exit code is 130. A full disk stops it too (exit 1).
    """
    result = counted = None
    try:
        with report:
            for result in results:
                with signals_held():
                    report.add(result)
                    counted = result
    except KeyboardInterrupt:
        report.interrupted = True
        if result is not counted:  # the stop came between receiving it and counting it
            report.add(result)
        for result in last_results(results):
            report.add(result)
    except StopRun as e:
        stopped(report, e)
    raise typer.Exit(report.finish())


def stopped(report: RunReport, e: StopRun) -> None:
    """The pipeline stopped (the disk is full: every later file would fail the same way): the file
    it happened to is a failure, and the summary says why the rest was not done."""
    report.add(e.result)
    report.extra["stopped"] = "disk full"
    err_console.print(
        "stopped: the disk is full; free some space and run the same command again to do the rest",
        highlight=False,
        soft_wrap=True,
    )


def write_gallery_reported(page: Path, write: Callable[[], Path | None], quiet: bool) -> Path | None:
    """Write a gallery (``page`` its path, ``write`` what writes it and returns None when a file of
    someone else's is there) and say on stderr where it went, or why not; never fails the run."""
    try:
        written = write()
    except OSError as e:
        err_console.print(shown(f"{page}: cannot write the gallery ({e.strerror or e})"), style="red", soft_wrap=True, highlight=False)
        return None
    if written is None:
        err_console.print(shown(f"{page}: not written, a file of someone else's is there"), style="red", soft_wrap=True, highlight=False)
    elif not quiet:
        err_console.print(f"gallery: {shown(written)}", highlight=False, soft_wrap=True)
    return written


def epilog(*examples: str) -> str:
    """An --help epilog of examples, one per line (the double newline keeps them apart in rich help)."""
    return "\n\n".join(["[bold]Examples[/bold]", *(f"  {shown(e)}" for e in examples)])


def help_text(text: str) -> str:
    """A help text written as an indented docstring, with each paragraph joined into one line
    (rich help keeps line breaks as they are)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
