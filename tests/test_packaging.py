"""The installed distribution, not the source tree.

The test suite imports edge3d from an editable install, which finds any module in the checkout.
A wheel or `pip install .` copies only the packages pyproject.toml lists, so a subpackage missing
from that list still passes every other test and breaks the deployment box (the runtime-only
install that a Jetson uses). These tests look at what a wheel carries and run it alone.
"""

from __future__ import annotations

import json
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


def test_the_toml_fallback_is_installed_on_python_3_10() -> None:
    """Profiles are read with tomllib, which Python 3.10 (JetPack 6's Python) lacks; there the code
    imports tomli, so the runtime's dependencies must bring it, or every CLI command fails at import."""
    from packaging.requirements import Requirement

    assert "import tomli" in (ROOT / "profiles" / "__init__.py").read_text()
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    tomli = [r for r in deps if r.name == "tomli"]
    assert len(tomli) == 1 and tomli[0].marker is not None
    assert tomli[0].marker.evaluate({"python_version": "3.10"}) and not tomli[0].marker.evaluate({"python_version": "3.11"})


def _build_isolation() -> list[str]:
    """Build with this environment's setuptools where it has what pyproject's build-system asks for.
    pip's isolated build fetches setuptools from the registry, which an offline machine (a GPU box
    running the suite) cannot reach; the wheel is the same either way."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    needs = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    try:
        if all(r.specifier.contains(version(r.name), prereleases=True) for r in needs):
            return ["--no-build-isolation"]
    except PackageNotFoundError:
        pass
    return []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in set(_setuptools_config()["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_build_isolation(),
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
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


# What a runtime-only install lacks: every optional package (pyproject's extras).
ABSENT = ("torch", "onnx", "onnxscript", "cv2", "matplotlib", "tritonclient", "polygraphy", "tensorrt", "pycuda")


def test_the_wheel_alone_runs_an_artifact_without_torch(wheel: Path, stream_artifact: Path, tmp_path: Path) -> None:
    """What a deployment box does (docs/jetson.md): install the wheel, copy the camera app, run an
    artifact with `edge3d run`, `edge3d bench` and the app, with no checkout and none of the optional
    packages. Python starts with -S, so the editable install's path hook (a .pth file) is not read and
    only the wheel's files can be imported; numpy, onnxruntime, typer and rich come from this
    environment's site-packages, seen through a folder that leaves the optional packages out."""
    art = stream_artifact
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import numpy

    # This environment's site-packages without the optional packages and without edge3d itself:
    # what `pip install edge3d-*.whl` gives a deployment box, where those imports really fail.
    site = Path(numpy.__file__).parents[1]
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        base = entry.name.split("-")[0].split(".")[0].lower()
        if base not in ABSENT and base != "edge3d" and not base.startswith("__editable__"):
            (deps / entry.name).symlink_to(entry)
    env = {"PYTHONPATH": f"{target}:{deps}", "PATH": "/usr/bin:/bin", "COLUMNS": "200"}

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-c", "import sys\n" + code], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)

    def edge3d(*args: str) -> subprocess.CompletedProcess:
        return python(f"from edge3d.cli import main\nsys.argv = ['edge3d', *{list(args)!r}]\nmain()\n")

    r = python("import edge3d\nprint('edge3d from', edge3d.__file__)\n")
    assert r.stdout.strip() == f"edge3d from {target / 'edge3d' / '__init__.py'}", r.stderr[-2000:]
    r = edge3d("run", str(art), "--source", "synthetic", "--frames", "6")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "ms/frame p50" in r.stdout and "backend / profile" in r.stdout
    # bench on an artifact, MatMul yardstick included, needs no onnx package
    r = edge3d("bench", str(art), "--frames", "8", "--rounds", "2", "--json-out", str(tmp_path / "b.json"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((tmp_path / "b.json").read_text())["ratios"]["step_gflops_vs_matmul"] > 0
    # a video needs OpenCV: the message keeps its brackets (rich markup would eat "[video]")
    (tmp_path / "clip.mp4").write_bytes(b"")
    r = edge3d("run", str(art), "--source", "clip.mp4")
    assert r.returncode == 2 and "pip install 'edge3d[video]'" in r.stderr, (r.stdout + r.stderr)[-2000:]
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0001.png").write_bytes(b"")
    r = edge3d("run", str(art), "--source", "frames")  # so do images
    assert r.returncode == 2 and "images and cameras needs OpenCV" in r.stderr, (r.stdout + r.stderr)[-2000:]
    # compare without matplotlib writes its report and says why there are no plots
    two = tmp_path / "two" / art.name  # compare needs a precision besides fp32, made here where onnx is
    shutil.copytree(art, two)
    from edge3d.exporters.precision import add_precisions

    add_precisions(two, ["fp16"])
    r = edge3d("compare", str(two), "--profiles", "fp32,fp16", "--frames", "6", "--out", "cmp")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "no plots: matplotlib is not installed (pip install 'edge3d[plots]')." in r.stdout
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["report.json", "report.md", "series.npz"]
    # a verb that needs an extra says which, in one line, and writes nothing
    for args, package, extra in ((("export", "gestures", "-o", "x"), "PyTorch and onnx", "export"),
                                 (("triton", str(art), "-o", "repo"), "tritonclient", "triton")):
        r = edge3d(*args)
        lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1, lines
        assert f"{args[0]} needs {package}, which this installation lacks; pip install 'edge3d[{extra}]'" \
            in lines[0], lines
        assert not (tmp_path / args[-1]).exists()
    app = shutil.copy(ROOT / "examples" / "jetson_app.py", tmp_path / "jetson_app.py")
    r = python(f"sys.argv = ['jetson_app.py', {str(art)!r}, '--source', 'synthetic', '--frames', '8', '--headless']\n"
               f"exec(compile(open({str(app)!r}).read(), 'jetson_app.py', 'exec'), {{'__name__': '__main__'}})\n")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done: 8 frames" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
