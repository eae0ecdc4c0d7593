"""The torch-free runtime: load an artifact and stream frames through it.

``import edge3d.runtime`` needs numpy only; the backend (onnxruntime, or tensorrt + pycuda)
is imported when a Session is created.
"""

from .manifest import FORMAT_VERSION, ArtifactError, load_manifest
from .preprocess import FrameScaleWarning
from .session import Session, Stats

__all__ = ["FORMAT_VERSION", "ArtifactError", "FrameScaleWarning", "Session", "Stats", "load_manifest"]
