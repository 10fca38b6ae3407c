"""The Typer application, shared options and the one place that maps errors to messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from vqcli.errors import UsageError, VqcliError


class _Commands(TyperGroup):
    """vqcli's commands; a usage error found while parsing a command line that asks for ``--json``
    (a bad option value, a missing argument) also gives the JSON error object on stdout."""

    def invoke(self, ctx: typer.Context) -> Any:
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # (the group's invoke consumes them)
        try:
            return super().invoke(ctx)
        except typer.TyperException as e:  # (the base of Typer's click exceptions: usage errors)
            if "--json" in args and hasattr(e, "format_message"):
                command = args[0] if args and not args[0].startswith("-") else None
                print_json_error(command, e.format_message(), getattr(e, "exit_code", EXIT_USAGE))
            raise


class _FlagsShownAsFlags:
    """Help that shows a boolean option as the flag it is (``--overwrite``), not ``--overwrite <bool>``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_FlagsShownAsFlags, TyperCommand):
    pass


class _Group(_FlagsShownAsFlags, _Commands):
    pass


class _Typer(typer.Typer):
    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(
    name="vqcli",
    help="Encode images into autoencoder latents and reconstruct them.",
    no_args_is_help=True,
    add_completion=True,
    cls=_Group,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from vqcli import __version__

        typer.echo(f"vqcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print vqcli's version and exit."),
    ] = False,
) -> None:
    """Encode images into autoencoder latents and reconstruct them.

    Start with: vqcli encode sample_images -o latents && vqcli decode latents -o recon
    """


# People's messages and progress go to stderr; data (tables, JSON) to stdout.
err_console = Console(stderr=True)
out_console = Console()

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM


# Characters that would act on a terminal or split a line rather than show: C0 and C1 controls
# (ESC, NUL, newline, ...), DEL, the Unicode line and paragraph separators, bidirectional overrides
# and isolates, and lone surrogates (bytes of a file name that are not UTF-8, as Python decodes them).
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object) -> str:
    """``text`` (anything that came from a file, a path or a user) as every printer here must show
    it: control characters written out as escapes (``\\x1b``, ``\\n``, ``\\x00``), so that
    nothing acts on the terminal and one message stays one line, and rich markup escaped, so that
    ``[red]`` or ``[link=...]`` shows as typed. For printing with markup on (rich's default)."""
    return escape(plain(text))


def plain(text: object) -> str:
    """``text`` with its control characters written out as escapes (``shown`` without the markup
    escaping: for output that rich does not interpret, the log lines)."""
    return _UNSHOWABLE.sub(_visible, str(text))


class _PlainFormatter(logging.Formatter):
    """Log lines (the library's warnings name files) with their control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return plain(super().format(record))


def json_result(command: str | None, ok: bool, **fields: Any) -> dict[str, Any]:
    """The envelope of every ``--json`` object: the command, whether it went well, then its fields."""
    return {"command": command, "ok": ok, **fields}


def print_json_error(command: str | None, message: str, code: int) -> None:
    """A fatal error as ``--json`` output: one object on stdout (the message also goes to stderr)."""
    out_console.print_json(json.dumps(json_result(command, False, error=message, exit_code=code)))


class _JsonMode:
    """The command under way when it was asked for ``--json`` (None otherwise): ``fail`` then also
    says its error as a JSON object on stdout."""

    command: str | None = None


def print_json(command: str, ok: bool, fields: dict) -> None:
    """Every command's --json object on stdout: ``json_result``'s envelope around its fields."""
    out_console.print_json(json.dumps(json_result(command, bool(ok), **fields)))


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr (and, under ``--json``, the error object on stdout) and
    return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, markup=True, soft_wrap=True)
    if _JsonMode.command is not None:
        print_json_error(_JsonMode.command, message, code)
    return typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn vqcli's own errors into one-line messages; VQCLI_DEBUG=1 shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _JsonMode.command = fn.__name__ if kwargs.get("as_json") else None
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except UsageError as e:
            if os.environ.get("VQCLI_DEBUG"):
                raise
            raise fail(str(e), EXIT_USAGE) from None
        except VqcliError as e:
            if os.environ.get("VQCLI_DEBUG"):
                raise
            raise fail(str(e), EXIT_SOME_FAILED) from None
        except OSError as e:  # a write that failed (a full disk, say): one line naming the file
            if os.environ.get("VQCLI_DEBUG"):
                raise
            raise fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e), EXIT_SOME_FAILED) from None
        finally:
            _JsonMode.command = None

    return wrapper


class _Terminated:
    """SIGTERM (a scheduler pre-empting the job, ``kill``) stops a run as Ctrl-C does: the writes
    under way finish, the summary and the manifest say what was done, a training run keeps its
    checkpoint. The exit code is then 143 (128 + SIGTERM), as for a process the signal ended."""

    received = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        if not cls.received:  # (a second SIGTERM while stopping does not interrupt the stopping)
            cls.received = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within, Ctrl-C and SIGTERM wait: a signal that comes is sent again on the way out, when the
    previous handlers are back. Counting a finished file (the summary, the manifest) is done
    inside, so that a stop cannot fall between the file being written and it being counted.
    (Only the main thread can set handlers; elsewhere nothing is held.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def main(argv: list[str] | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_PlainFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    signal.signal(signal.SIGTERM, _Terminated.handler)
    try:
        app(args=argv, prog_name="vqcli")
    except SystemExit as e:
        if _Terminated.received and e.code == EXIT_INTERRUPTED:
            raise SystemExit(EXIT_TERMINATED) from None
        raise
