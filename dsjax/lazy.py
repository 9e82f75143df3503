"""Package re-exports resolved on first use (PEP 562), so importing one submodule of a package
does not load its siblings: `dsjax.planner.latency` alone stays small, while
`from dsjax.planner import Simulator` still works."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `package + "." + exports[name]` when `name` is asked for."""

    def __getattr__(name: str) -> object:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
