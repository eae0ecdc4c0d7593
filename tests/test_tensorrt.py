"""TensorRT deployment: build options, command lines, build_engines.sh, manifest entries, backend choice,
the `edge3d export --target tensorrt` / `edge3d build` commands and the Jetson app.

Everything not marked ``gpu`` runs without TensorRT. The ``gpu`` tests build and run real engines;
they need tensorrt, pycuda and an NVIDIA GPU and skip with that reason elsewhere. Nothing here
mocks TensorRT: the stub ``trtexec``/``polygraphy`` executables below only check what our
generated shell script passes to them, and the monkeypatched availability only drives
``_pick_backend``'s decision table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge3d.exporters import tensorrt as trtx
from edge3d.runtime import ArtifactError, Session, load_manifest
from edge3d.runtime import backend as backends
from edge3d.runtime.backend import trt as trt_backend
from edge3d.runtime.manifest import write_manifest
from edge3d.runtime.session import _pick_backend

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
WEAK_TYPING = {"--fp16", "--int8", "--best", "--bf16", "--fp8", "--int4"}
STREAMS = 2
SIZE = 32


def weak_flags(argv: list[str]) -> list[str]:
    """Precision builder flags (weak typing) in a command line: TensorRT 11 removed all of them."""
    return [a for a in argv if a.split("=")[0] in WEAK_TYPING or "calib" in a.lower()]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge3d.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`edge3d export ... --target tensorrt` on a tiny D-ResNet-18 (the one slow step, shared)."""
    out = tmp_path_factory.mktemp("trt")
    proc = run_cli("export", "d-resnet18", "--width", "0.125", "--classes", "5", "--size", str(SIZE),
                   "--target", "tensorrt", "--streams", str(STREAMS), "-o", str(out))
    return proc, out / "d-resnet18.edge3d"


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    proc, path = exported
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture()
def three_precisions(artifact, tmp_path) -> Path:
    """A copy of the artifact whose manifest lists fp16 and int8 graphs as the precision exporter writes them.

    Only the manifest is needed to derive build options and command lines, so the graphs themselves
    are not created here.
    """
    folder = tmp_path / artifact.name
    shutil.copytree(artifact, folder)
    m = load_manifest(folder)
    for p in ("fp16", "int8"):
        m["precisions"][p] = {"file": f"model.{p}.onnx", "profile": p,
                              "state_dtypes": {s["name"]: "float16" if p == "fp16" else "float32"
                                               for s in m["states"]}}
    write_manifest(folder, m)
    return folder


# --------------------------------------------------------------------------- TensorRT 10 vs 11
def test_strong_typing_flags_follow_the_major_version():
    t10 = trtx.strong_typing(10)
    assert t10.network_flags == ("STRONGLY_TYPED",)
    assert t10.trtexec == ("--stronglyTyped",) and t10.polygraphy == ("--strongly-typed",)
    for major in (11, 12):
        t = trtx.strong_typing(major)
        assert t.network_flags == () and t.trtexec == () and t.polygraphy == ()
    for major in (8, 9):
        with pytest.raises(ValueError, match="TensorRT 10 or newer"):
            trtx.strong_typing(major)


# --------------------------------------------------------------------------- build options
def test_build_options_take_shapes_and_onnx_from_the_manifest(three_precisions):
    m = load_manifest(three_precisions)
    for profile in ("fp32", "fp16", "int8"):
        o = trtx.build_options(m, profile, streams=3, dla=1, workspace_mb=512)
        assert o.onnx == f"model.{profile}.onnx" and o.engine == f"model.{profile}.engine"
        assert (o.streams, o.dla_core, o.workspace_mb, o.tf32) == (3, 1, 512, False)
        f = m["frame"]
        frame = (f["channels"], f["height"], f["width"])
        assert o.shapes["frame"] == ((1, *frame), (3, *frame), (3, *frame))
        state_inputs = [s["input"] for s in m["states"]]
        assert list(o.shapes) == ["frame", *state_inputs]
        for s in m["states"]:
            dims = tuple(s["shape"][1:])
            assert o.shapes[s["input"]] == ((1, *dims), (3, *dims), (3, *dims))
    assert trtx.build_options(m, "fp32").streams == 8  # the CLI default
    with pytest.raises(ArtifactError, match="no 'fp8' precision.*fp32, fp16, int8"):
        trtx.build_options(m, "fp8")
    for bad in ({"streams": 0}, {"dla": -1}, {"workspace_mb": 0}, {"streams": 2.5}, {"dla": 0.0}, {"dla": True},
                {"workspace_mb": "512"}):
        with pytest.raises(ValueError, match="must be"):
            trtx.build_options(m, "fp32", **bad)
    # NumPy integers, as an app reading its config with NumPy passes them, come out as plain ints
    o = trtx.build_options(m, "fp32", streams=np.int64(2), dla=np.int64(0), workspace_mb=np.int32(256))
    assert (o.streams, o.dla_core, o.workspace_mb) == (2, 0, 256)
    assert all(type(v) is int for v in (o.streams, o.dla_core, o.workspace_mb))


# --------------------------------------------------------------------------- command lines
def _shapes_from_trtexec(argv: list[str], flag: str) -> dict[str, tuple[int, ...]]:
    spec = next(a for a in argv if a.startswith(flag + "=")).split("=", 1)[1]
    return {name: tuple(int(d) for d in dims.split("x"))
            for name, dims in (item.rsplit(":", 1) for item in spec.split(","))}


@pytest.mark.parametrize("major", [10, 11])
def test_trtexec_command_lines(three_precisions, major):
    m = load_manifest(three_precisions)
    typing = trtx.strong_typing(major)
    for profile in ("fp32", "fp16", "int8"):
        o = trtx.build_options(m, profile, streams=4)
        argv = trtx.trtexec_command(o, typing.trtexec)
        assert argv[0] == "trtexec"
        assert f"--onnx=model.{profile}.onnx" in argv and f"--saveEngine=model.{profile}.engine" in argv
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            assert _shapes_from_trtexec(argv, flag) == {k: v[i] for k, v in o.shapes.items()}
        assert _shapes_from_trtexec(argv, "--maxShapes")["state_in.head.temporal.history"] == (4, 960)
        assert "--timingCacheFile=timing.cache" in argv and "--memPoolSize=workspace:1024" in argv
        assert ("--stronglyTyped" in argv) == (major == 10)
        assert weak_flags(argv) == []
        assert not any(a.startswith("--useDLACore") for a in argv)
    dla = trtx.trtexec_command(trtx.build_options(m, "fp16", dla=1))
    assert "--useDLACore=1" in dla and "--allowGPUFallback" in dla


@pytest.mark.parametrize("major", [10, 11])
def test_polygraphy_command_lines(three_precisions, major):
    m = load_manifest(three_precisions)
    typing = trtx.strong_typing(major)
    o = trtx.build_options(m, "int8", streams=4, dla=0)
    argv = trtx.polygraphy_command(o, typing.polygraphy)
    assert argv[:3] == ["polygraphy", "convert", "model.int8.onnx"] and argv[argv.index("-o") + 1] == "model.int8.engine"
    mins = argv[argv.index("--trt-min-shapes") + 1:argv.index("--trt-opt-shapes")]
    assert mins == [f"{k}:[{','.join(map(str, v[0]))}]" for k, v in o.shapes.items()]
    assert ("--strongly-typed" in argv) == (major == 10)
    assert "--use-dla" in argv and "--allow-gpu-fallback" in argv
    assert argv.count("timing.cache") == 2
    assert weak_flags(argv) == []


@pytest.mark.skipif(shutil.which("polygraphy") is None, reason="polygraphy is not installed")
def test_polygraphy_accepts_the_generated_options(artifact):
    """Polygraphy parses the whole command line, then stops where it needs TensorRT (absent here)."""
    o = trtx.build_options(load_manifest(artifact), "fp32", streams=2, dla=0)
    argv = trtx.polygraphy_command(o, trtx.strong_typing(10).polygraphy)
    proc = subprocess.run(argv, cwd=artifact, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "Unrecognized Options" not in out and "error: argument" not in out, out
    if importlib_util_find("tensorrt") is None:
        assert "'tensorrt' is required" in out, out


def importlib_util_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


# --------------------------------------------------------------------------- build_engines.sh
def test_export_target_tensorrt_exits_0_and_writes_the_script(exported):
    proc, path = exported
    assert proc.returncode == 0, proc.stderr
    script = path / trtx.SCRIPT
    assert script.is_file() and os.access(script, os.X_OK)
    if not trtx.tensorrt_ready():
        assert "no engine was built" in proc.stdout and "build_engines.sh" in proc.stdout
        assert load_manifest(path)["engines"] == {}
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_the_script_path_told_without_tensorrt_can_be_pasted_into_a_shell(artifact, tmp_path):
    if trtx.tensorrt_ready():
        pytest.skip("TensorRT is present here, so engines are built rather than the script named")
    import io

    from rich.console import Console

    folder = tmp_path / "my models" / artifact.name
    shutil.copytree(artifact, folder)
    said = io.StringIO()
    trtx.build_or_script(folder, ["fp32"], console=Console(file=said, width=400))
    assert f"run '{folder / trtx.SCRIPT}' (or `edge3d build`)" in said.getvalue(), said.getvalue()


def test_script_has_one_build_per_precision_from_its_onnx(three_precisions):
    m = load_manifest(three_precisions)
    opts = [trtx.build_options(m, p, streams=2) for p in ("fp32", "fp16", "int8")]
    text = trtx.write_script(three_precisions, m, opts).read_text()
    assert subprocess.run(["bash", "-n", str(three_precisions / trtx.SCRIPT)]).returncode == 0
    for p in ("fp32", "fp16", "int8"):
        assert text.count(f"--onnx=model.{p}.onnx") == 1 and text.count(f"convert model.{p}.onnx") == 1
    words = text.replace("\\\n", " ").split()
    assert weak_flags(words) == []
    assert "--stronglyTyped" in text and "--strongly-typed" in text  # only in the 10.x branch, see below


def test_build_or_script_takes_profiles_as_one_comma_separated_string(three_precisions, tmp_path):
    if trtx.tensorrt_ready():
        pytest.skip("TensorRT is installed here, so build_or_script would build engines")
    folder = shutil.copytree(three_precisions, tmp_path / "art.edge3d")
    (folder / trtx.SCRIPT).unlink(missing_ok=True)
    written = trtx.build_or_script(folder, "fp32, fp16", streams=2)
    text = (folder / trtx.SCRIPT).read_text()
    assert written == [folder / trtx.SCRIPT]
    assert [p for p in ("fp32", "fp16", "int8") if f"--onnx=model.{p}.onnx" in text] == ["fp32", "fp16"]


STUB = """#!/usr/bin/env bash
if [ "${1:-}" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_TRT] # trtexec --help"; exit 0; fi
echo "---" >> "$STUB_LOG"; printf '%s\\n' "$@" >> "$STUB_LOG"
"""


def _run_script(folder: Path, tmp_path: Path, tool: str, version: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run build_engines.sh against stub tools that record their arguments (no TensorRT involved)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    for name in ("trtexec", "polygraphy"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    fake = tmp_path / "fake_trt" / "tensorrt"  # what `python3 -c 'import tensorrt'` finds for polygraphy
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    major = int(version.split(".")[0])
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "TRTEXEC": str(bin_dir / "trtexec"), "PYTHONPATH": str(fake.parent),
           "FAKE_TRT": str(major * (10000 if major >= 10 else 1000))}
    proc = subprocess.run(["bash", str(folder / trtx.SCRIPT), tool], capture_output=True, text=True, env=env,
                          timeout=60)
    calls = [c.strip().splitlines() for c in log.read_text().split("---")[1:]] if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("tool", ["trtexec", "polygraphy"])
def test_script_adds_strongly_typed_only_for_tensorrt_10(three_precisions, tmp_path, tool):
    m = load_manifest(three_precisions)
    opts = [trtx.build_options(m, p, streams=2) for p in ("fp32", "fp16", "int8")]
    trtx.write_script(three_precisions, m, opts)
    flag = "--stronglyTyped" if tool == "trtexec" else "--strongly-typed"
    for version, strongly in (("10.3.0", True), ("11.0.0", False)):
        proc, calls = _run_script(three_precisions, tmp_path, tool, version)
        assert proc.returncode == 0, proc.stderr
        assert len(calls) == 3, calls
        typing = trtx.strong_typing(int(version.split(".")[0]))
        for call, o in zip(calls, opts, strict=True):
            expected = (trtx.trtexec_command(o, typing.trtexec)[1:] if tool == "trtexec"
                        else trtx.polygraphy_command(o, typing.polygraphy)[1:])
            assert call == expected
            assert (flag in call) == strongly
    proc, calls = _run_script(three_precisions, tmp_path, tool, "8.6.1")
    assert proc.returncode != 0 and calls == []
    assert "TensorRT 8.x found" in proc.stderr and "TensorRT 10 or newer" in proc.stderr


def test_script_refuses_polygraphy_for_dla_cores_it_cannot_target(three_precisions, tmp_path):
    m = load_manifest(three_precisions)
    trtx.write_script(three_precisions, m, [trtx.build_options(m, "fp16", dla=1)])
    proc, calls = _run_script(three_precisions, tmp_path, "polygraphy", "10.3.0")
    assert proc.returncode != 0 and calls == [] and "DLA core 0" in proc.stderr
    proc, calls = _run_script(three_precisions, tmp_path, "trtexec", "10.3.0")
    assert proc.returncode == 0 and "--useDLACore=1" in calls[0]


# --------------------------------------------------------------------------- manifest entries
def test_engine_entry_round_trips_through_the_manifest(three_precisions):
    m = load_manifest(three_precisions)
    o = trtx.build_options(m, "fp16", streams=4, dla=0, workspace_mb=256)
    entry = trtx.engine_entry(o, tensorrt_version="10.3.0", device="Orin (sm_87)", sha256="sha256:00",
                              typing=trtx.strong_typing(10), dla_used=True)
    assert entry["file"] == "model.fp16.engine" and entry["onnx"] == "model.fp16.onnx"
    assert (entry["precision"], entry["tensorrt"], entry["device"]) == ("fp16", "10.3.0", "Orin (sm_87)")
    assert entry["strongly_typed"] is True
    b = entry["build"]
    assert (b["streams"], b["workspace_mb"], b["dla_core"], b["dla_used"], b["tf32"]) == (4, 256, 0, True, False)
    assert b["network_flags"] == ["STRONGLY_TYPED"] and b["timing_cache"] == "timing.cache"
    assert b["shapes"]["frame"] == [[1, 3, SIZE, SIZE], [4, 3, SIZE, SIZE], [4, 3, SIZE, SIZE]]
    assert trtx.engine_entry(o, tensorrt_version="11.0", device="x", sha256="", typing=trtx.strong_typing(11),
                             dla_used=False)["build"]["network_flags"] == []
    m["engines"]["fp16"] = entry
    write_manifest(three_precisions, m)
    again = load_manifest(three_precisions)
    assert again["engines"]["fp16"] == json.loads(json.dumps(entry))
    assert trt_backend.engine_path(again, "fp16") == three_precisions / "model.fp16.engine"
    assert not trt_backend.has_engine(again, "fp16")  # recorded, but the file is gone: auto must not pick it
    (three_precisions / "model.fp16.engine").write_bytes(b"")
    assert trt_backend.has_engine(again, "fp16") and not trt_backend.has_engine(again, "int8")
    (three_precisions / "model.int8.engine").write_bytes(b"")  # built by build_engines.sh: found by name
    assert trt_backend.has_engine(again, "int8")


# --------------------------------------------------------------------------- backend selection
def test_gpu_available_never_raises():
    assert isinstance(trt_backend.gpu_available(), bool)
    if importlib_util_find("tensorrt") is None or importlib_util_find("pycuda") is None:
        assert trt_backend.gpu_available() is False


class _Driver:
    """Stands in for libcuda's two entry points, to drive driver_gpu_count's reading of their results."""

    def __init__(self, init_result: int, count: int):
        self.init_result, self.count = init_result, count

    def cuInit(self, flags):  # noqa: N802 - the driver API's name
        return self.init_result

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = self.count
        return 0


def test_driver_gpu_count_reads_libcuda(monkeypatch):
    import ctypes

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert trt_backend.driver_gpu_count() is None
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _Driver(100, 0))  # CUDA_ERROR_NO_DEVICE
    assert trt_backend.driver_gpu_count() == 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _Driver(0, 3))
    assert trt_backend.driver_gpu_count() == 3


@pytest.mark.parametrize("installed, gpus, pycuda_works, reason", [
    ((), None, False, "the tensorrt and pycuda packages are not installed and no NVIDIA driver was found"),
    (("tensorrt",), 1, False, "the pycuda package is not installed"),  # JetPack: TensorRT without pycuda
    (("pycuda",), 1, False, "the tensorrt package is not installed"),  # a GPU server without TensorRT
    (("tensorrt", "pycuda"), 0, False, "the NVIDIA driver sees no GPU"),
    (("tensorrt", "pycuda"), 2, False, "CUDA could not be started through pycuda, though the driver reports 2 GPU(s)"),
])
def test_why_unavailable_names_only_what_is_missing(monkeypatch, installed, gpus, pycuda_works, reason):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in installed else None if name in ("tensorrt", "pycuda")
                        else real(name, *a))
    monkeypatch.setattr(trt_backend, "driver_gpu_count", lambda: gpus)
    monkeypatch.setattr(trt_backend, "gpu_available", lambda: pycuda_works)
    assert trt_backend.why_unavailable() == reason
    with pytest.raises(ArtifactError, match="and here " + re.escape(reason)):
        _pick_backend("tensorrt", {"precisions": {}}, "fp32")


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no nvidia-smi: no NVIDIA driver here")
def test_driver_gpu_count_agrees_with_nvidia_smi():
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    assert trt_backend.driver_gpu_count() == sum(line.startswith("GPU ") for line in listed.splitlines())


@pytest.mark.skipif(importlib_util_find("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_auto_uses_onnxruntime_and_explicit_tensorrt_fails_clearly(three_precisions):
    m = load_manifest(three_precisions)
    m["engines"]["fp32"] = {"file": "model.fp32.engine"}  # an engine built elsewhere does not matter here
    write_manifest(three_precisions, m)
    with Session(three_precisions, backend="auto") as s:
        assert s.backend_name == "onnxruntime"
        assert s.step(np.zeros((SIZE, SIZE, 3), np.uint8)).shape == (5,)
    with pytest.raises(ArtifactError, match="needs the tensorrt and pycuda packages and an NVIDIA GPU, and here the "
                       "tensorrt (and pycuda )?packages? (is|are) not installed"):
        Session(three_precisions, backend="tensorrt")
    proc = run_cli("run", str(three_precisions), "--backend", "tensorrt", "--frames", "1", "--quiet")
    assert proc.returncode == 2 and "tensorrt and pycuda" in proc.stderr and "Traceback" not in proc.stderr
    assert "use the onnxruntime backend (--backend onnxruntime," in " ".join(proc.stderr.split())  # the CLI's fix


def test_pick_backend_decision_table(three_precisions, monkeypatch):
    """The choice itself, with availability forced each way; what each backend does is tested elsewhere."""
    m = load_manifest(three_precisions)
    monkeypatch.setattr(backends, "available", lambda: ["tensorrt", "onnxruntime"])
    monkeypatch.setattr(trt_backend, "gpu_available", lambda: False)  # TensorRT installed, no GPU
    assert _pick_backend("auto", m, "fp32") == "onnxruntime"
    with pytest.raises(ArtifactError, match="NVIDIA GPU"):
        _pick_backend("tensorrt", m, "fp32")
    monkeypatch.setattr(trt_backend, "gpu_available", lambda: True)
    assert _pick_backend("auto", m, "fp32") == "onnxruntime"  # no engine for the profile yet
    assert _pick_backend("tensorrt", m, "fp32") == "tensorrt"  # ...the backend then says what to build
    (three_precisions / "model.fp32.engine").write_bytes(b"")
    assert _pick_backend("auto", m, "fp32") == "tensorrt"
    assert _pick_backend("onnxruntime", m, "fp32") == "onnxruntime"
    monkeypatch.setattr(backends, "available", lambda: ["onnxruntime"])
    assert _pick_backend("auto", m, "fp32") == "onnxruntime"
    with pytest.raises(ValueError, match="unknown backend"):
        _pick_backend("tvm", m, "fp32")


def test_missing_engine_names_the_fix(artifact):
    m = load_manifest(artifact)
    with pytest.raises(ArtifactError, match=r"no TensorRT engine for 'fp32'.*edge3d build.*build_engines\.sh"):
        trt_backend.TensorRTBackend(m, "fp32", 1)


@pytest.mark.skipif(importlib_util_find("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_command_without_tensorrt_fails_in_one_sentence(artifact):
    proc = run_cli("build", str(artifact), "--profile", "fp32")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "needs the tensorrt and pycuda packages and an NVIDIA GPU" in err and "build_engines.sh" in err
    proc = run_cli("build", str(artifact), "--profile", "fp8")
    assert proc.returncode == 2 and "no 'fp8' precision" in proc.stderr


# --------------------------------------------------------------------------- the Jetson app
APP = ROOT / "examples" / "jetson_app.py"
RUN_APP = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
assert "torch" not in sys.modules, "the app imported torch"
sys.exit(code)
"""


def _app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_APP, str(APP), *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path_factory.mktemp("clip") / "bar.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48))
    for i in range(120):
        f = np.zeros((48, 64, 3), np.uint8)
        f[:, (3 * i) % 56:(3 * i) % 56 + 8] = 255
        w.write(f)
    w.release()
    return path


def test_jetson_app_runs_headless_on_a_video(artifact, clip):
    proc = _app(str(artifact), "--source", str(clip), "--backend", "onnxruntime", "--frames", "100", "--headless",
                "--log-every", "25")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "backend onnxruntime, profile fp32" in lines[0]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("frame ")] == ["frame 25", "frame 50", "frame 75",
                                                                             "frame 100"]
    assert lines[-1].startswith("done: 100 frames")


def test_jetson_app_runs_headless_on_the_synthetic_source(artifact):
    pytest.importorskip("edge3d.data.gestures")
    proc = _app(str(artifact), "--source", "synthetic", "--backend", "onnxruntime", "--frames", "100", "--headless")
    assert proc.returncode == 0, proc.stderr
    # the synthetic labels are gesture classes; this artifact's classes are not, so there is no accuracy
    assert "done: 100 frames" in proc.stdout and "per-frame accuracy" not in proc.stdout


def test_jetson_app_steps_several_cameras_in_one_call_as_each_alone(artifact, clip):
    """A second --source replaced the first: an app told to watch two cameras watched one. Each camera is
    now a stream of one Session, stepped together, and shows what it shows when it runs alone."""
    pytest.importorskip("edge3d.data.gestures")
    common = ("--backend", "onnxruntime", "--frames", "12", "--headless", "--log-every", "1")
    both = _app(str(artifact), "--source", str(clip), "--source", "synthetic:3", *common)
    assert both.returncode == 0, both.stderr
    lines = both.stdout.splitlines()
    assert lines[0].endswith(", 2 streams") and lines[-1].startswith("done: 24 frames (stream 0: 12, stream 1: 12)")
    rounds = [dict(part.split(": ", 1) for part in ln.split("; ")[2:]) for ln in lines if ln.startswith("frame ")]
    assert len(rounds) == 12
    for i, source in enumerate((str(clip), "synthetic:3")):
        alone = _app(str(artifact), "--source", source, *common)
        assert alone.returncode == 0, alone.stderr
        shown = [ln.split("; ")[2] for ln in alone.stdout.splitlines() if ln.startswith("frame ")]
        assert [r[str(i)] for r in rounds] == shown
    twice = _app(str(artifact), "--source", "synthetic", "--frames", "12", "--headless", "--frames=3")
    assert twice.returncode == 2 and "--frames was given 2 times, and it takes one value; give it once" in twice.stderr


def test_run_and_the_jetson_app_give_onnxruntime_their_threads(artifact, monkeypatch, capsys):
    """--threads reaches the ONNX Runtime session (a Jetson app leaves cores to the camera pipeline)."""
    from edge3d.runtime.backend import onnxrt
    from typer.testing import CliRunner

    from edge3d.cli import app

    seen = []
    load = onnxrt._load_session
    monkeypatch.setattr(onnxrt, "_load_session",
                        lambda path, threads, spin=True: seen.append(threads) or load(path, threads, spin))
    res = CliRunner().invoke(app, ["run", str(artifact), "--frames", "3", "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["run", str(artifact), "--frames", "3", "--quiet"])
    assert res.exit_code == 0 and seen == [1, None]  # unset: ONNX Runtime's own choice
    sys.path.insert(0, str(APP.parent))
    try:
        import jetson_app
    finally:
        sys.path.pop(0)
    assert jetson_app.main([str(artifact), "--source", "synthetic", "--backend", "onnxruntime", "--headless",
                            "--frames", "3", "--threads", "2"]) == 0
    assert seen[-1] == 2
    capsys.readouterr()


def test_jetson_app_reports_bad_input_in_one_sentence(artifact, tmp_path):
    proc = _app(str(tmp_path / "missing.edge3d"), "--source", "synthetic", "--headless")
    assert proc.returncode == 2 and proc.stderr.startswith("error: artifact") and "Traceback" not in proc.stderr
    proc = _app(str(artifact), "--source", str(tmp_path / "nope.mp4"), "--headless")
    assert proc.returncode == 2 and f"source '{tmp_path / 'nope.mp4'}' does not exist" in proc.stderr
    proc = _app(str(artifact), "--source", "webcam", "--headless")
    # the app's own sources are named with the runtime's
    assert proc.returncode == 2 and "is neither a file, a folder, camera:INDEX, csi:SENSOR, a GStreamer pipeline " \
        "ending in appsink" in proc.stderr
    proc = _app(str(artifact), "--source", "csi:front", "--headless")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: CSI source 'csi:front' needs a numeric sensor " \
        "id, e.g. csi:0."


def test_jetson_app_without_headless_on_an_opencv_without_windows_is_one_sentence(artifact):
    """The headless OpenCV the video extra installs cannot open a window: the app died in a cv2.error
    traceback at its first frame."""
    cv2 = pytest.importorskip("cv2")
    gui = next((line.split(":", 1)[1].strip() for line in cv2.getBuildInformation().splitlines()
                if line.strip().startswith("GUI:")), "")
    if gui != "NONE":
        pytest.skip(f"this OpenCV has windows ({gui}); the app would open one")
    proc = _app(str(artifact), "--source", "synthetic", "--backend", "onnxruntime", "--frames", "5")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: this OpenCV cannot open a window (a headless " \
        "build such as opencv-python-headless, or no display); pass --headless to log the stats only.", proc.stderr


def test_jetson_app_says_when_the_camera_stops(artifact, clip, monkeypatch, capsys):
    """The app as a camera service: a camera that stops delivering frames is an error (exit 1)
    after the usual closing line, not a clean end."""
    from test_export_runtime import camera_unplugged_after

    camera_unplugged_after(clip, monkeypatch)
    sys.path.insert(0, str(APP.parent))
    try:
        import jetson_app
    finally:
        sys.path.pop(0)
    code = jetson_app.main([str(artifact), "--source", "camera:0", "--backend", "onnxruntime", "--headless"])
    out = capsys.readouterr()
    assert code == 1 and "done: 120 frames" in out.out
    assert out.err == "error: camera 0 stopped delivering frames after 120 frames; check its connection.\n"
    capsys.readouterr()
    for flag, value in (("--log-every", "0"), ("--width", "0"), ("--height", "-720"), ("--fps", "0"),
                        ("--threads", "0")):
        assert jetson_app.main([str(artifact), "--source", "csi:0", "--backend", "onnxruntime", "--headless",
                                flag, value]) == 2
        assert capsys.readouterr().err == f"error: {flag} must be at least 1, got {value}.\n"


def test_jetson_app_says_when_it_cannot_keep_up_with_a_camera(artifact, monkeypatch, capsys):
    """A camera app falling behind its camera lags the scene, or sees a lower frame rate than the camera's;
    it says so once, on stderr, and its closing lines give both rates."""
    import time

    from edge3d.runtime import Session
    from test_export_runtime import camera_sending

    from edge3d import sources

    monkeypatch.setattr(sources, "RATE_WINDOW_S", 0.3)
    step = Session.step
    monkeypatch.setattr(Session, "step", lambda self, frame, stream=0: (time.sleep(0.01), step(self, frame, stream))[1])
    camera_sending(200.0, 0.0, monkeypatch)
    sys.path.insert(0, str(APP.parent))
    try:
        import jetson_app
    finally:
        sys.path.pop(0)
    code = jetson_app.main([str(artifact), "--source", "camera:1", "--backend", "onnxruntime", "--headless",
                            "--frames", "80"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.err.count("warning: camera 1 sends 200 frames a second and the app took ") == 1, out.err
    assert re.search(r"^camera 1: sends 200 fps, the app took [\d.]+ \(fell behind\)$", out.out, re.M), out.out


def test_jetson_app_stops_cleanly_on_sigterm(artifact):
    """`systemctl stop` sends SIGTERM: the app ends as on Ctrl-C, with its closing line and exit 0."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", RUN_APP, str(APP), str(artifact), "--source", "synthetic",
                             "--backend", "onnxruntime", "--headless", "--log-every", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:  # wait until it streams
            if line.startswith("frame 20:"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1].startswith("done: ")


def test_overlay_draws_class_and_latency():
    pytest.importorskip("cv2")
    sys.path.insert(0, str(APP.parent))
    try:
        import jetson_app
    finally:
        sys.path.pop(0)
    rgb = np.full((120, 160, 3), 40, np.uint8)
    bgr = jetson_app.overlay(rgb, "wave 0.93", 1.25)
    assert bgr.shape == rgb.shape and (rgb == 40).all()  # the input frame is left alone
    changed = (bgr != 40).any(axis=2)
    assert changed[:60].sum() > 100 and changed[70:].sum() == 0  # two text lines at the top
    boxed = (jetson_app.overlay(rgb, "", 1.25, crop=(112, 112)) != 40).any(axis=2)  # a cropping artifact's
    cols = np.flatnonzero(boxed[100])  # below the text: the box's two sides, round the centre 120×120
    assert cols.min() == 20 and cols.max() == 139 and boxed[100, 22:138].sum() == 0, cols
    from edge3d.sources import csi_pipeline

    assert csi_pipeline(1, 640, 480, 30).startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM), "
                                                    "width=640, height=480, framerate=30/1 ! ")


# --------------------------------------------------------------------------- on a GPU with TensorRT
def _need_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    if not trt_backend.gpu_available():
        pytest.skip("no NVIDIA GPU visible to CUDA")


TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "int8": 1.5e-1}  # max |Δ| over 64 frames, relative to output scale


@pytest.fixture(scope="module")
def engines(artifact, tmp_path_factory) -> Path:
    _need_gpu()
    folder = tmp_path_factory.mktemp("gpu") / artifact.name
    shutil.copytree(artifact, folder)
    trtx.build_engines(folder, None, streams=STREAMS)
    return folder


def _frames(n: int, streams: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, streams, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.gpu
def test_engines_match_fp32_onnxruntime_over_64_frames(engines):
    m = load_manifest(engines)
    assert set(m["engines"]) == set(m["precisions"])
    frames = _frames(64, STREAMS)
    with Session(engines, backend="onnxruntime", streams=STREAMS) as ref:
        want = np.stack([ref.step_batch(list(f)) for f in frames])
    scale = max(1.0, float(np.abs(want).max()))
    for profile, entry in m["engines"].items():
        assert entry["strongly_typed"] and (engines / entry["file"]).is_file()
        with Session(engines, profile=profile, backend="tensorrt", streams=STREAMS) as s:
            assert s.backend_name == "tensorrt"
            got = np.stack([s.step_batch(list(f)) for f in frames])
        err = np.abs(got.astype(np.float64) - want).max(axis=(1, 2))
        assert (err <= TOLERANCE.get(profile, 0.15) * scale).all(), (profile, err.max(), scale)


@pytest.mark.gpu
def test_ping_pong_states_snapshots_and_subsets(engines):
    frames = _frames(12, STREAMS, seed=1)
    with Session(engines, backend="onnxruntime", streams=STREAMS) as ref, \
            Session(engines, backend="tensorrt", streams=STREAMS) as s:
        for f in frames[:5]:  # an odd number of steps leaves the states in the second buffer set
            ref.step_batch(list(f))
            s.step_batch(list(f))
        snap = s.get_state()
        ref_snap = ref.get_state()
        for name, a in snap.items():
            assert a.shape == ref_snap[name].shape
            np.testing.assert_allclose(a, ref_snap[name], atol=1e-3 * max(1.0, np.abs(ref_snap[name]).max()))
        first = [s.step_batch(list(f)) for f in frames[5:9]]
        s.set_state(snap)
        for name, a in s.get_state().items():
            assert np.array_equal(a, snap[name])  # restored bit for bit
        again = [s.step_batch(list(f)) for f in frames[5:9]]
        np.testing.assert_allclose(np.stack(again), np.stack(first), rtol=0, atol=1e-5 * max(1.0, np.abs(first).max()))
        # stepping stream 1 alone must equal the ONNX Runtime reference doing the same, and leave stream 0 alone
        s.set_state(snap)
        ref.set_state(ref_snap)
        before = s.get_state()
        out = s.step_batch([frames[9][1]], [1])
        want = ref.step_batch([frames[9][1]], [1])
        np.testing.assert_allclose(out, want, atol=1e-3 * max(1.0, np.abs(want).max()))
        after, ref_after = s.get_state(), ref.get_state()
        for name in after:
            assert np.array_equal(after[name][0], before[name][0])  # the stream not stepped is untouched
            np.testing.assert_allclose(after[name], ref_after[name],
                                       atol=1e-3 * max(1.0, np.abs(ref_after[name]).max()))
        # all streams in another order go through the subset path, not the full batch's buffers
        out = s.step_batch([frames[10][1], frames[10][0]], [1, 0])
        want = ref.step_batch([frames[10][1], frames[10][0]], [1, 0])
        np.testing.assert_allclose(out, want, atol=1e-3 * max(1.0, np.abs(want).max()))
        before = s.get_state()
        s.reset(1)
        for name, a in s.get_state().items():
            init = next(st.get("init", 0.0) for st in s.manifest["states"] if st["name"] == name)
            assert (a[1] == init).all() and np.array_equal(a[0], before[name][0])


@pytest.mark.gpu
def test_cuda_graphs_give_the_same_outputs(engines):
    m = load_manifest(engines)
    frames = _frames(8, STREAMS, seed=2)
    plain = trt_backend.TensorRTBackend(m, "fp32", STREAMS)
    graphed = trt_backend.TensorRTBackend(m, "fp32", STREAMS, cuda_graphs=True)
    try:
        for f in frames:
            a, b = plain.step_all(f), graphed.step_all(f)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        assert set(graphed._graphs) == {0, 1}  # both ping-pong parities were captured and replayed
    finally:
        plain.close()
        graphed.close()
