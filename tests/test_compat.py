"""Artifacts from this workstation's onnxruntime run unchanged on the oldest onnxruntime edge3d supports.

Devices (JetPack) often carry an older onnxruntime than the machine that exported the artifact. This
installs onnxruntime 1.17 (pyproject's minimum) with the runtime alone into a fresh virtual environment,
streams every precision of two test artifacts there, and compares the outputs with this environment's.
Slow (it installs packages from the registry), so it is kept out of CI; the IR-version and int8-lowmem
graph-shape tests in test_precision.py guard the causes in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge3d.runtime import Session
from precision_helpers import pattern_stream

pytestmark = pytest.mark.slow
OLDEST = "1.17.1"
REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, numpy as np, onnxruntime
from edge3d.runtime import Session
frames = np.load(sys.argv[1])
out = {}
for art, profiles in json.loads(sys.argv[3]).items():
    for p in profiles:
        with Session(art, profile=p, threads=1) as s:
            out[art + ":" + p] = np.stack([s.step(f) for f in frames])
np.savez(sys.argv[2], **out)
print(onnxruntime.__version__)
"""


def _venv(folder: Path, packages: list[str]) -> list[str]:
    """A fresh virtual environment in ``folder`` with ``packages`` and edge3d (no extras); its pip
    command, for later installs. Skips the test where the package registry cannot be reached."""
    env = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *packages], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install {' '.join(packages)} from the package registry: {done.stderr.strip()[-200:]}")
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True)
    return pip


@pytest.fixture(scope="module")
def old_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with onnxruntime OLDEST and edge3d without extras; its python."""
    return Path(_venv(tmp_path_factory.mktemp("ort-old"), [f"onnxruntime=={OLDEST}", "numpy<2", "typer", "rich"])[0])


def test_every_precision_streams_the_same_outputs_on_the_oldest_onnxruntime(old_runtime: Path, dresnet: Path,
                                                                            stateful: Path, tmp_path: Path) -> None:
    frames = np.stack([f for f, _ in pattern_stream(100, seed=6)])
    np.save(tmp_path / "frames.npy", frames)
    profiles = {str(a): list(json.loads((a / "manifest.json").read_text())["precisions"]) for a in (dresnet, stateful)}
    assert all({"fp32", "fp16", "int8", "int8-lowmem"} <= set(p) for p in profiles.values())
    done = subprocess.run([str(old_runtime), "-c", SCRIPT, str(tmp_path / "frames.npy"), str(tmp_path / "old.npz"),
                           json.dumps(profiles)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == OLDEST
    old = np.load(tmp_path / "old.npz")
    for art, names in profiles.items():
        for p in names:
            with Session(art, profile=p, threads=1) as s:
                new = np.stack([s.step(f) for f in frames])
            # fp16 kernels differ slightly between onnxruntime versions (measured up to 0.0042 on 1.17)
            tol = 0.02 if p.startswith("fp16") else 1e-5 * max(1.0, float(np.abs(new).max()))
            assert np.abs(old[f"{art}:{p}"] - new).max() <= tol, (art, p)
    # bench on an artifact (its MatMul yardstick is a model of its own) runs there too
    bench = subprocess.run([str(old_runtime.parent / "edge3d"), "bench", str(dresnet), "--frames", "5", "--rounds", "1",
                            "--json-out", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stdout[-1500:] + bench.stderr[-1500:]
    assert json.loads((tmp_path / "b.json").read_text())["ratios"]["step_gflops_vs_matmul"] > 0


def test_exporting_works_on_older_onnxruntime(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """fp32 and fp16 export on onnxruntime 1.17 (the raw graph is lowered to IR 8 before ONNX Runtime
    simplifies it), INT8 on 1.20 (whose symbolic shape inference fails on step graphs: onnx's is used)."""
    pip = _venv(tmp_path_factory.mktemp("ort-export"), ["torch==2.13.0", f"onnxruntime=={OLDEST}", "numpy<2", "onnx",
                                                         "onnxscript", "typer", "rich"])
    cli = Path(pip[0]).parent / "edge3d"
    out = tmp_path / "out"
    first = subprocess.run([str(cli), "export", "gestures", "--profile", "fp16", "-o", str(out)], capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stdout[-1500:] + first.stderr[-1500:]
    subprocess.run([*pip, "onnxruntime==1.20.1"], check=True)
    art = out / "gestures.edge3d"
    second = subprocess.run([str(cli), "export", str(art), "--profile", "int8", "--calib-frames", "64"],
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    from edge3d.data.gestures import iter_stream

    frames = [f for (f, _), _ in zip(iter_stream(3), range(200), strict=False)]
    outs = {}
    for p in ("fp32", "fp16", "int8"):
        with Session(art, profile=p, threads=1) as s:
            outs[p] = np.stack([s.step(f) for f in frames])
    assert np.abs(outs["fp16"] - outs["fp32"]).max() < 0.05
    assert (outs["int8"].argmax(-1) == outs["fp32"].argmax(-1)).mean() >= 0.95
