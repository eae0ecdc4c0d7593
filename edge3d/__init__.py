"""edge3d: causal video networks as per-frame step graphs with explicit state.

Importing this package must stay cheap and torch-free, because a Jetson app installs
edge3d without the export extra and imports only the runtime. Everything that needs
torch is reached lazily through ``__getattr__``.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# ONNX Runtime 1.29+ (its official Linux wheels) records telemetry by default: a device id and a
# queue of events (the OS, CPU and memory, the executable's path, one per session created) under
# ~/.cache/Microsoft, for Microsoft's collector. A camera app should not phone home because it runs a model, so edge3d turns it off before
# onnxruntime is first imported, unless the user has set the variable (ORT_DISABLE_TELEMETRY=0 keeps it on).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_LAZY = {
    "to_step": ("edge3d.convert", "to_step"),
    "StepModule": ("edge3d.convert", "StepModule"),
    "inspect": ("edge3d.accounting", "inspect"),
    # a model object in hand (not a factory the CLI can import) is exported from Python
    "export_artifact": ("edge3d.exporters.onnx", "export_artifact"),
    "add_precisions": ("edge3d.exporters.precision", "add_precisions"),
    # what the runtime does with frames and outputs, changed in an exported artifact without exporting again
    "set_frame": ("edge3d.exporters.onnx", "set_frame"),
    "set_class_names": ("edge3d.exporters.onnx", "set_class_names"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edge3d' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
