"""The OpenCV a device has is not always pip's newest: JetPack 6 ships OpenCV 4.8 (the build with
GStreamer, for CSI cameras), compiled against NumPy 1.x.

Two faults came from that. `_cv2()` called ``cv2.utils.logging``, which OpenCV 4.8 and 4.9 do not
have, so every video and camera source failed with an AttributeError traceback. And once pip put
NumPy 2 into the venv, that OpenCV failed to import after NumPy printed a twenty-line block: the
runtime's resize retried the import for every frame (the block thirty times a second), and the
source's error told the user to install pip's OpenCV, which has no GStreamer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, randomize
from edge3d.exporters.onnx import export_artifact
from precision_helpers import write_video

from edge3d import zoo

REPO = Path(__file__).resolve().parents[1]
NUMPY_SAYS = ("\nA module that was compiled using NumPy 1.x cannot be run in\nNumPy 2.x as it may crash. To support "
              "both 1.x and 2.x\nversions of NumPy, modules must be compiled with NumPy 2.0.\n")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = randomize(zoo.build("d-resnet18", **TINY), seed=3)
    return export_artifact(model, tmp_path_factory.mktemp("art"), "tiny", frame_size=32, verify=False)


def _edge3d(python: str, args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([python, "-m", "edge3d.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_an_opencv_built_for_numpy_1_is_tried_once_and_named_with_the_fix(artifact: Path, tmp_path: Path) -> None:
    """A stand-in cv2 that fails to import as such a build does under NumPy 2 (NumPy's text on stderr,
    then ImportError), and counts how often it is tried: pip's OpenCV here imports fine."""
    fake = tmp_path / "site" / "cv2"
    fake.mkdir(parents=True)
    tries = tmp_path / "tries"
    (fake / "__init__.py").write_text(
        "import sys\n"
        f"open({str(tries)!r}, 'a').write('x')\n"
        f"sys.stderr.write({NUMPY_SAYS!r})\n"
        "raise ImportError('numpy.core.multiarray failed to import')\n")
    # synthetic frames are 112 px, resized to the model's 32: the resize falls back to numpy
    done = _edge3d(sys.executable, ["run", str(artifact), "--source", "synthetic", "--frames", "20"], tmp_path,
                   tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert "compiled using NumPy 1.x" not in done.stdout + done.stderr
    assert tries.read_text() == "x"  # once for 20 frames, not once per frame
    (tmp_path / "clip.mp4").write_bytes(b"not read: OpenCV is needed first")
    done = _edge3d(sys.executable, ["run", str(artifact), "--source", "clip.mp4"], tmp_path, tmp_path / "site")
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in said and "compiled using" not in said
    assert said.startswith("error: reading video files, images and cameras needs OpenCV, and the installed OpenCV "
                           "was built against NumPy 1.x, and this environment has NumPy ")
    assert "pip install 'numpy<2'" in said and "edge3d[video]" not in said  # pip's OpenCV lacks GStreamer


def test_without_opencv_the_frames_are_resized_in_numpy_and_a_video_asks_for_it(artifact: Path,
                                                                               tmp_path: Path) -> None:
    """A runtime-only install (no OpenCV) is told to install the video extra, as before."""
    blocker = tmp_path / "site" / "sitecustomize.py"
    blocker.parent.mkdir()
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cv2':\n"
        "            raise ModuleNotFoundError(\"No module named 'cv2'\", name='cv2')\n"
        "sys.meta_path.insert(0, Block())\n")
    (tmp_path / "clip.mp4").write_bytes(b"video")
    done = _edge3d(sys.executable, ["run", str(artifact), "--source", "clip.mp4"], tmp_path, tmp_path / "site")
    assert done.returncode == 2
    assert "needs OpenCV; pip install 'edge3d[video]' (or use --source synthetic)." in " ".join(done.stderr.split())


def test_opencv_4_8_and_4_9_have_their_log_level_set_without_cv2_utils_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch the slow test below runs on the real OpenCV 4.9, here with a stand-in module holding
    only what 4.8 and 4.9 have (cv2.setLogLevel, no cv2.utils.logging)."""
    import types

    from edge3d.runtime import preprocess

    from edge3d import sources

    levels: list[int] = []
    old_cv2 = types.SimpleNamespace(setLogLevel=levels.append, utils=types.SimpleNamespace())
    monkeypatch.setattr(preprocess, "_CV2", {"module": old_cv2, "error": None})
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)
    assert sources._cv2() is old_cv2 and levels == [2]  # ERROR, as cv2.utils.logging.LOG_LEVEL_ERROR
    monkeypatch.setenv("OPENCV_LOG_LEVEL", "DEBUG")  # the user's own level is left alone
    assert sources._cv2() is old_cv2 and levels == [2]


@pytest.mark.slow
def test_opencv_4_9_reads_videos_and_under_numpy_2_is_named(artifact: Path, tmp_path: Path) -> None:
    """The real thing: opencv-python-headless 4.9 (built against NumPy 1.x, without cv2.utils.logging,
    as JetPack's 4.8) in a fresh venv, first with NumPy 1.x, then with NumPy 2. Slow: it installs
    packages from the registry."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "opencv-python-headless==4.9.0.80", "numpy<2", "onnxruntime", "typer", "rich"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install OpenCV 4.9 from the package registry: {done.stderr.strip()[-200:]}")
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True)
    python = str(env / "bin" / "python")
    rng = np.random.default_rng(0)
    write_video(tmp_path / "clip.avi", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)])
    done = _edge3d(python, ["run", str(artifact), "--source", "clip.avi", "--output", "p.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 12
    subprocess.run([*pip, "numpy>=2"], check=True)
    done = _edge3d(python, ["run", str(artifact), "--source", "clip.avi"], tmp_path)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "the installed OpenCV was built against NumPy 1.x" in said, said
    assert "Traceback" not in said and "compiled using" not in said
