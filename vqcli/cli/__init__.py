"""The ``vqcli`` command line. Parses, calls the library, formats; no model code here.

Each command lives in its own module and registers itself on ``app``; the import order below is
the order ``vqcli --help`` lists them.
"""

from __future__ import annotations

from vqcli.cli._app import app, main

# isort: off
# (imported for their commands, in the order of `vqcli --help`)
from vqcli.cli import encode as _encode  # noqa: F401
from vqcli.cli import decode as _decode  # noqa: F401
from vqcli.cli import roundtrip as _roundtrip  # noqa: F401
from vqcli.cli import features as _features  # noqa: F401
from vqcli.cli import info as _info  # noqa: F401
from vqcli.cli import convert as _convert  # noqa: F401
from vqcli.cli import stats as _stats  # noqa: F401
from vqcli.cli import train as _train  # noqa: F401
# isort: on

__all__ = ["app", "main"]
