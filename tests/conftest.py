"""Shared fixtures: one tiny exported artifact per test session (export costs seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """d-resnet18 at width 0.125, 5 classes, 32x32 frames: ten states of every kind it has, in ~10 s."""
    pytest.importorskip("torch")
    from edge3d import zoo
    from edge3d.exporters.onnx import export_artifact

    model = zoo.build("d-resnet18", width=0.125, num_classes=5).eval()
    return export_artifact(model, tmp_path_factory.mktemp("artifacts"), "tiny", frame_size=32)
