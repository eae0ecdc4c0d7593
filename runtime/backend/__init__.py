"""Runtime backends. Each owns the state buffers of its device and steps a batch of streams.

Heavy imports (onnxruntime, tensorrt) happen only inside the backend module that needs them.
"""

from __future__ import annotations

from typing import Any

from .base import Backend


def available() -> list[str]:
    """Backends importable here, in order of preference for ``backend="auto"``."""
    import importlib.util

    names = []
    if importlib.util.find_spec("tensorrt") is not None:
        names.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("onnxruntime")
    return names


def create(name: str, manifest: dict[str, Any], profile: str, streams: int, **options: Any) -> Backend:
    if name == "onnxruntime":
        from .onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, profile, streams, **options)
    if name == "tensorrt":
        from .trt import TensorRTBackend

        return TensorRTBackend(manifest, profile, streams, **options)
    raise ValueError(f"unknown backend {name!r}; choose auto, onnxruntime or tensorrt.")


__all__ = ["Backend", "available", "create"]
