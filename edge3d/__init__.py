"""edge3d: causal video networks as per-frame step graphs with explicit state.

Importing this package must stay cheap and torch-free, because a Jetson app installs
edge3d without the export extra and imports only the runtime. Everything that needs
torch is reached lazily through ``__getattr__``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# pyproject.toml maps exporters/, runtime/ and profiles/ into this package (package-dir). An
# installed wheel has them inside edge3d/ already; a source checkout put first on PYTHONPATH
# does not, and without this finder ``edge3d.runtime`` would silently come from whatever other
# checkout is editable-installed (its finder sits later on sys.meta_path). So a checkout maps
# its own sibling folders, and code and tests always run against the tree they live in.
_ROOT = Path(__file__).resolve().parent.parent
_SOURCE_DIRS = {f"edge3d.{d}": _ROOT / d for d in ("exporters", "runtime", "profiles")
                if (_ROOT / "pyproject.toml").is_file() and (_ROOT / d / "__init__.py").is_file()}


class _SourceTreeFinder:
    """Meta-path finder for the package-dir mapped subpackages of a source checkout."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
        folder = _SOURCE_DIRS.get(fullname)
        if folder is None:
            return None
        from importlib.util import spec_from_file_location

        return spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


if _SOURCE_DIRS:
    sys.meta_path.insert(0, _SourceTreeFinder)

_LAZY = {
    "to_step": ("edge3d.convert", "to_step"),
    "StepModule": ("edge3d.convert", "StepModule"),
    "inspect": ("edge3d.accounting", "inspect"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edge3d' has no attribute {name!r}")


def _resolve_checkout_subpackages() -> None:
    """Run a source checkout as installed: ``PYTHONPATH=<checkout>`` must import *its* pipeline folders.

    pyproject's ``package-dir`` maps ``exporters/``, ``runtime/`` and ``profiles/`` into this
    namespace only for an install (an editable install maps them to *its* checkout). Adding the
    checkout root to ``__path__`` lets ``edge3d.exporters`` etc. resolve beside this file first, so a
    second worktree on PYTHONPATH does not silently run another checkout's runtime. An installed
    wheel has no pyproject.toml beside the package, so nothing changes there.
    """
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and root not in __path__:
        __path__.append(root)


_resolve_checkout_subpackages()
