"""edge3d: causal video networks as per-frame step graphs with explicit state.

Importing this package must stay cheap and torch-free, because a Jetson app installs
edge3d without the export extra and imports only the runtime. Everything that needs
torch is reached lazily through ``__getattr__``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

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
