"""The ``vqcli`` command line. Parses, calls the library, formats; no model code here.

Each command lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import sys

from ._app import app, main  # noqa: F401

# Importing the command modules registers their commands.
from . import train as _train  # noqa: F401,E402
from . import convert as _convert  # noqa: F401,E402
from . import decode as _decode, encode as _encode, features as _features, info as _info  # noqa: F401,E402

__all__ = ["app", "main"]
