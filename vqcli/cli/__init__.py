"""The ``vqcli`` command line. Parses, calls the library, formats; no model code here.

Each command lives in its own module and registers itself on ``app``; the import order below is
the order ``vqcli --help`` lists them.
"""

from __future__ import annotations

from ._app import app, main  # noqa: F401

from . import encode as _encode  # noqa: F401,E402,I001
from . import decode as _decode  # noqa: F401,E402
from . import roundtrip as _roundtrip  # noqa: F401,E402
from . import features as _features  # noqa: F401,E402
from . import info as _info  # noqa: F401,E402
from . import convert as _convert  # noqa: F401,E402
from . import train as _train  # noqa: F401,E402

__all__ = ["app", "main"]
