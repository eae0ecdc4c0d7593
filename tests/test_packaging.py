"""The installed distribution, not the source tree.

The test suite imports edge3d from an editable install, which finds any module in the checkout.
A wheel or `pip install .` copies only the packages pyproject.toml lists, so a subpackage missing
from that list still passes every other test and breaks the deployment box (the runtime-only
install that a Jetson uses). These tests look at what a wheel carries and run it alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Every dotted package under the mapped folders (a folder with __init__.py), and its folder."""
    found: dict[str, Path] = {}
    for name, folder in _setuptools_config()["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            found.setdefault(".".join([name, *init.parent.relative_to(base).parts]), init.parent)
    return found


def test_pyproject_lists_every_package_folder() -> None:
    declared = set(_setuptools_config()["packages"])
    missing = sorted(set(_package_folders()) - declared)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in set(_setuptools_config()["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("edge3d-*.whl")
    return whl


def test_the_wheel_carries_every_module_and_profile(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{pkg.replace('.', '/')}/{f.relative_to(folder).as_posix()}" for pkg, folder in _package_folders().items()
                for f in folder.rglob("*") if f.suffix in (".py", ".toml", ".pt") and "__pycache__" not in f.parts}
    assert {"edge3d/runtime/backend/onnxrt.py", "edge3d/profiles/int8.toml",
            "edge3d/zoo/weights/gestures_d_resnet18.pt"} <= expected
    assert not expected - names, sorted(expected - names)


def test_the_wheel_alone_runs_an_artifact_without_torch(wheel: Path, stream_artifact: Path, tmp_path: Path) -> None:
    """What a deployment box does (docs/jetson.md): install the wheel, copy the camera app, and run an
    artifact with `edge3d run` and with the app, with no torch and no checkout. Python starts with -S, so the editable install's path hook (a .pth file) is not read
    and only the wheel's files can be imported; numpy, onnxruntime, typer and rich come from this
    environment's site-packages."""
    art = stream_artifact
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import numpy

    deps = str(Path(numpy.__file__).parents[1])
    block = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = block + (
        "import edge3d\n"
        "print('edge3d from', edge3d.__file__)\n"
        "from edge3d.cli import main\n"
        f"sys.argv = ['edge3d', 'run', {str(art)!r}, '--source', 'synthetic', '--frames', '6']\n"
        "main()\n"
    )
    env = {"PYTHONPATH": f"{target}:{deps}", "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"edge3d from {target}" in r.stdout
    assert "ms/frame p50" in r.stdout and "backend / profile" in r.stdout
    app = shutil.copy(ROOT / "examples" / "jetson_app.py", tmp_path / "jetson_app.py")
    code = block + (
        f"sys.argv = ['jetson_app.py', {str(art)!r}, '--source', 'synthetic', '--frames', '8', '--headless']\n"
        f"exec(compile(open({str(app)!r}).read(), 'jetson_app.py', 'exec'), {{'__name__': '__main__'}})\n"
    )
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done: 8 frames" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
