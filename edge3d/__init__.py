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

# pyproject maps the top-level folders exporters/, runtime/ and profiles/ to edge3d.exporters,
# edge3d.runtime and edge3d.profiles. An installed wheel has them inside edge3d/; a source
# checkout on PYTHONPATH does not, and an editable install elsewhere would silently serve *its*
# copies instead. So when this file sits in a checkout, its own folders are registered first.
_ROOT = Path(__file__).resolve().parent.parent
_SUBPACKAGES = {f"edge3d.{d}": _ROOT / d for d in ("exporters", "runtime", "profiles")}


class _CheckoutFinder:
    """Meta-path finder for the mapped subpackages of a source checkout (and their modules)."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        import importlib.util
        from importlib.machinery import PathFinder

        folder = _SUBPACKAGES.get(fullname)
        if folder is not None:
            return importlib.util.spec_from_file_location(
                fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])
        parent = fullname.rpartition(".")[0]
        if parent in _SUBPACKAGES:
            spec = PathFinder.find_spec(fullname, [str(_SUBPACKAGES[parent])])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return spec
        return None


if (_ROOT / "pyproject.toml").is_file() and all((d / "__init__.py").is_file() for d in _SUBPACKAGES.values()) \
        and not (Path(__file__).parent / "runtime").is_dir() and _CheckoutFinder not in sys.meta_path:
    sys.meta_path.insert(0, _CheckoutFinder)  # type: ignore[arg-type]

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
