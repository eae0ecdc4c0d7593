"""TensorRT engines for an artifact: strongly typed builds from each precision's ONNX, or a script.

Precision lives in the ONNX (DESIGN.md): an engine is built from exactly one precision's graph
(``model.fp16.onnx`` with its casts, ``model.int8.onnx`` with its Q/DQ nodes) as a strongly typed
network, so TensorRT runs the types ONNX Runtime measured, and no weak-typing builder flag
(FP16/INT8, calibrators) is ever set -- TensorRT 11 removed them. Engines only run on the GPU
model and TensorRT version that built them, so they are built on the device: ``edge3d build``
there, or the ``build_engines.sh`` this module writes with the same options as plain
``trtexec`` / ``polygraphy convert`` command lines. Needs no torch: it runs on a Jetson that has
only the runtime installed.
"""

from __future__ import annotations

import importlib.util
import numbers
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..profiles import split_names
from ..runtime.backend import trt as trt_backend
from ..runtime.manifest import (
    ArtifactError,
    file_sha256,
    is_positive_int,
    load_manifest,
    precision_entry,
    require_single_graph,
    resolve_artifact,
    state_io_names,
    write_manifest,
)

SCRIPT = "build_engines.sh"
TIMING_CACHE = "timing.cache"
MIN_TRT_MAJOR = 10
DEFAULT_WORKSPACE_MB = 1024
Shape = tuple[int, ...]


# --------------------------------------------------------------------------- TensorRT 10 vs 11
@dataclass(frozen=True)
class StrongTyping:
    """How one TensorRT major version is asked for a strongly typed network."""

    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members to set
    trtexec: tuple[str, ...]
    polygraphy: tuple[str, ...]


def strong_typing(major: int) -> StrongTyping:
    """The one place that knows how each TensorRT version spells "strongly typed".

    TensorRT 10 (JetPack 6 on Orin) builds weakly typed unless asked, so it gets the
    STRONGLY_TYPED creation flag / ``--stronglyTyped`` / ``--strongly-typed``. TensorRT 11 removed
    weak typing: every network is strongly typed and the opt-in is no longer needed. Before 10
    there is no usable strong typing for our FP16 and Q/DQ graphs.
    """
    if major < MIN_TRT_MAJOR:
        raise ValueError(
            f"TensorRT {major}.x cannot build edge3d engines: they are strongly typed, which needs TensorRT "
            f"{MIN_TRT_MAJOR} or newer (JetPack 6 on Jetson)."
        )
    if major == 10:
        return StrongTyping(("STRONGLY_TYPED",), ("--stronglyTyped",), ("--strongly-typed",))
    return StrongTyping((), (), ())


# --------------------------------------------------------------------------- build options
@dataclass(frozen=True)
class BuildOptions:
    """Everything one engine build needs, derived from the manifest alone (so it is testable here)."""

    profile: str
    onnx: str  # file in the artifact folder
    engine: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
    streams: int
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    dla_core: int | None = None
    timing_cache: str = TIMING_CACHE
    tf32: bool = False  # an "fp32" engine computes in FP32, so precision comparisons mean what they say

    def record(self) -> dict[str, Any]:
        """The build options as stored in manifest["engines"][profile]["build"]."""
        d = asdict(self)
        d["shapes"] = {k: [list(s) for s in v] for k, v in self.shapes.items()}
        for key in ("profile", "onnx", "engine"):
            d.pop(key)
        return d


def profile_shapes(manifest: dict[str, Any], streams: int) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimisation-profile shapes for the frame and every state input: batch 1..streams, opt = streams."""
    f = manifest["frame"]
    per_stream: dict[str, Shape] = {f.get("name", "frame"): (int(f["channels"]), int(f["height"]), int(f["width"]))}
    for s in manifest["states"]:
        per_stream[s.get("input") or state_io_names(s["name"])[0]] = tuple(int(d) for d in s["shape"][1:])
    return {name: ((1, *dims), (streams, *dims), (streams, *dims)) for name, dims in per_stream.items()}


def check_build_flags(streams: int = 8, dla: int | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB) -> None:
    """Checked on their own so that `edge3d export --target tensorrt` fails before the slow export."""
    if not is_positive_int(streams):
        raise ValueError(f"--streams must be a positive integer, got {streams!r}.")
    if not is_positive_int(workspace_mb):
        raise ValueError(f"--workspace must be a whole number of MiB, at least 1, got {workspace_mb!r}.")
    if dla is not None and (isinstance(dla, bool) or not isinstance(dla, numbers.Integral) or dla < 0):
        raise ValueError(f"--dla must be a DLA core index (0, 1, ...), got {dla!r}.")


def build_options(manifest: dict[str, Any], profile: str, *, streams: int = 8, dla: int | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB) -> BuildOptions:
    """Map a precision profile of the artifact to the options of its engine build."""
    check_build_flags(streams, dla, workspace_mb)
    entry = precision_entry(manifest, profile)
    backends = (entry.get("spec") or {}).get("backends", ["tensorrt"])
    if "tensorrt" not in backends:
        raise ValueError(
            f"precision {profile!r} does not target TensorRT (its profile lists {', '.join(backends)}; e.g. "
            "int8-cpu's uint8 activations); build engines from a precision whose profile lists tensorrt, such as int8."
        )
    streams = int(streams)  # plain ints from here on: NumPy integers reach the manifest's JSON and TensorRT
    return BuildOptions(profile=profile, onnx=entry["file"], engine=f"model.{profile}.engine",
                        shapes=profile_shapes(manifest, streams), streams=streams, workspace_mb=int(workspace_mb),
                        dla_core=None if dla is None else int(dla))


# --------------------------------------------------------------------------- command lines
def trtexec_command(opts: BuildOptions, typing: tuple[str, ...] = ()) -> list[str]:
    """``trtexec`` argv building ``opts.engine`` from ``opts.onnx``; ``typing`` from ``strong_typing``."""

    def spec(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in opts.shapes.items())

    # --memPoolSize without a unit suffix means MiB in TensorRT 8.6 to 10 (suffix spellings changed between them)
    cmd = ["trtexec", f"--onnx={opts.onnx}", f"--saveEngine={opts.engine}", f"--minShapes={spec(0)}",
           f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}", f"--memPoolSize=workspace:{opts.workspace_mb}",
           f"--timingCacheFile={opts.timing_cache}", "--skipInference"]
    if not opts.tf32:
        cmd.append("--noTF32")
    if opts.dla_core is not None:
        cmd += [f"--useDLACore={opts.dla_core}", "--allowGPUFallback"]
    return cmd + list(typing)


def polygraphy_command(opts: BuildOptions, typing: tuple[str, ...] = ()) -> list[str]:
    """``polygraphy convert`` argv for the same build (Polygraphy leaves TF32 off unless asked).

    Polygraphy can only target DLA core 0, so other cores are left to trtexec.
    """
    cmd = ["polygraphy", "convert", opts.onnx, "--convert-to", "trt", "-o", opts.engine]
    for flag, i in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
        cmd += [flag, *(f"{name}:[{','.join(map(str, s[i]))}]" for name, s in opts.shapes.items())]
    cmd += ["--pool-limit", f"workspace:{opts.workspace_mb}M", "--load-timing-cache", opts.timing_cache,
            "--save-timing-cache", opts.timing_cache]
    if opts.tf32:
        cmd.append("--tf32")
    if opts.dla_core == 0:
        cmd += ["--use-dla", "--allow-gpu-fallback"]
    return cmd + list(typing)


_SCRIPT_HEAD = """#!/usr/bin/env bash
# Build the TensorRT engines of the edge3d artifact {name!r} on the device that will run them:
# an engine only runs on the GPU model and TensorRT version that built it.
# Written by edge3d {version}; regenerate it (edge3d export --target tensorrt) rather than editing it.
#
#   bash build_engines.sh               # trtexec if found (PATH or JetPack's /usr/src/tensorrt/bin), else polygraphy
#   bash build_engines.sh polygraphy    # or: trtexec
#   TRTEXEC=/path/to/trtexec bash build_engines.sh
#
# Each engine is built strongly typed from its own precision's ONNX (FP16 casts, Q/DQ nodes are in
# the graph), never with precision builder flags. TensorRT 10 needs the strongly-typed flag, which
# TensorRT 11 made the only mode; the script asks the installed TensorRT for its version.
set -euo pipefail
cd "$(dirname "$0")"

TOOL="${{1:-auto}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || true)}}"
if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi
if [ "$TOOL" = auto ]; then
  if [ -n "$TRTEXEC" ]; then TOOL=trtexec
  elif command -v polygraphy >/dev/null 2>&1; then TOOL=polygraphy
  else echo "error: neither trtexec nor polygraphy found; install TensorRT (JetPack) or polygraphy." >&2; exit 1
  fi
fi

trt_major() {{
  # trtexec prints "[TensorRT v100300]" (major*10000 + minor*100 + patch; 8.x used major*1000 + ...).
  local v=""
  if [ "$TOOL" = trtexec ]; then
    v=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1 || true)
    if [ -n "$v" ]; then
      if [ "$v" -ge 100000 ]; then echo $((v / 10000)); else echo $((v / 1000)); fi
      return
    fi
  else
    v=$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])' 2>/dev/null || true)
    if [ -n "$v" ]; then echo "$v"; return; fi
  fi
  echo "error: cannot tell the TensorRT version ($TOOL); install TensorRT 10+ (JetPack 6) on this device." >&2
  exit 1
}}
MAJOR=$(trt_major)
if [ "$MAJOR" -lt {min_major} ]; then
  echo "error: TensorRT $MAJOR.x found; strongly typed edge3d engines need TensorRT {min_major} or newer (JetPack 6)." >&2
  exit 1
elif [ "$MAJOR" -eq 10 ]; then
  TRTEXEC_TYPING="{trtexec10}"; POLYGRAPHY_TYPING="{poly10}"
else
  TRTEXEC_TYPING="{trtexec11}"; POLYGRAPHY_TYPING="{poly11}"
fi
echo "building {count} engine(s) with $TOOL (TensorRT $MAJOR)"
"""


def _shell_lines(args: list[str]) -> str:
    """Quoted arguments, one option per continuation line, so a user can read and edit the script."""
    return "".join((" \\\n    " if a.startswith("-") else " ") + shlex.quote(a) for a in args)


def write_script(folder: Path, manifest: dict[str, Any], options: list[BuildOptions]) -> Path:
    """Write ``build_engines.sh``: one trtexec and one polygraphy line per precision."""
    t10, t11 = strong_typing(10), strong_typing(11)
    text = _SCRIPT_HEAD.format(name=manifest.get("name", folder.name), version=__version__,
                               min_major=MIN_TRT_MAJOR, count=len(options),
                               trtexec10=" ".join(t10.trtexec), poly10=" ".join(t10.polygraphy),
                               trtexec11=" ".join(t11.trtexec), poly11=" ".join(t11.polygraphy))
    for o in options:
        trtexec = '"$TRTEXEC"' + _shell_lines(trtexec_command(o)[1:]) + " $TRTEXEC_TYPING"
        if o.dla_core not in (None, 0):
            poly = f'echo "error: polygraphy only targets DLA core 0; use trtexec for core {o.dla_core}" >&2; exit 1'
        else:
            poly = "polygraphy" + _shell_lines(polygraphy_command(o)[1:]) + " $POLYGRAPHY_TYPING"
        text += (f"\n# {o.profile}: {o.onnx} -> {o.engine}\n"
                 f'if [ "$TOOL" = trtexec ]; then\n  {trtexec}\nelse\n  {poly}\nfi\n'
                 f'echo "wrote {o.engine}"\n')
    path = folder / SCRIPT
    path.write_text(text)
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- building
def tensorrt_ready() -> bool:
    """True where an engine can be built here: tensorrt importable and a GPU visible to pycuda."""
    return importlib.util.find_spec("tensorrt") is not None and trt_backend.gpu_available()


def engine_entry(opts: BuildOptions, *, tensorrt_version: str, device: str, sha256: str,
                 typing: StrongTyping, dla_used: bool) -> dict[str, Any]:
    """manifest["engines"][profile]: what the runtime and a reader need to trust the engine."""
    build = opts.record()
    build["network_flags"] = list(typing.network_flags)
    build["dla_used"] = dla_used
    return {"file": opts.engine, "precision": opts.profile, "onnx": opts.onnx, "tensorrt": tensorrt_version,
            "device": device, "strongly_typed": True, "sha256": sha256, "built": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build": build}


def _log(console: Any, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False, soft_wrap=True)


def build_engine(folder: Path, opts: BuildOptions, console: Any = None) -> dict[str, Any]:
    """Build one strongly typed engine with the TensorRT API; return its manifest entry."""
    import tensorrt as trt

    from ..runtime.backend.trt import gpu_name

    typing = strong_typing(int(trt.__version__.split(".")[0]))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in typing.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / opts.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {opts.onnx} ({errors[:300]}); re-export the artifact.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if not opts.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in opts.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_file = folder / opts.timing_cache
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        _log(console, f"{cache_file.name} is from another GPU or TensorRT; starting a fresh timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    dla_used = False
    if opts.dla_core is not None:
        cores = builder.num_DLA_cores
        if cores == 0:
            _log(console, f"this GPU has no DLA; building {opts.engine} for the GPU")
        elif opts.dla_core >= cores:
            raise ValueError(f"--dla {opts.dla_core} does not exist: this device has DLA cores 0..{cores - 1}.")
        else:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = opts.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            dla_used = True
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ValueError(f"TensorRT failed to build {opts.engine} from {opts.onnx}; see the TensorRT log above.")
    (folder / opts.engine).write_bytes(memoryview(plan))
    cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    _log(console, f"built [bold]{opts.engine}[/] from {opts.onnx} in {time.perf_counter() - t0:.1f} s "
                  f"(TensorRT {trt.__version__}, strongly typed)")
    return engine_entry(opts, tensorrt_version=trt.__version__, device=gpu_name(), typing=typing,
                        sha256=file_sha256(folder / opts.engine), dla_used=dla_used)


def targets_tensorrt(manifest: dict[str, Any]) -> list[str]:
    """The precisions whose profile lists TensorRT among its backends (all, for entries without a spec)."""
    return [p for p, e in manifest["precisions"].items()
            if "tensorrt" in (e.get("spec") or {}).get("backends", ["tensorrt"])]


def build_engines(path: str | Path, profiles: str | list[str] | None = None, *, streams: int = 8, dla: int | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, console: Any = None) -> list[Path]:
    """Build ``model.<profile>.engine`` for each profile (default: every precision targeting TensorRT)."""
    folder = resolve_artifact(path)
    manifest = load_manifest(folder)
    require_single_graph(manifest, "a TensorRT engine")
    options = [build_options(manifest, p, streams=streams, dla=dla, workspace_mb=workspace_mb)
               for p in (split_names(profiles) or targets_tensorrt(manifest))]
    if not tensorrt_ready():
        raise ValueError(
            "building TensorRT engines needs the tensorrt and pycuda packages and an NVIDIA GPU, and here "
            f"{trt_backend.why_unavailable()}; run `edge3d build` on the device, or {folder / SCRIPT} there "
            "(`edge3d export --target tensorrt` writes it)."
        )
    built = []
    for opts in options:
        manifest.setdefault("engines", {})[opts.profile] = build_engine(folder, opts, console)
        write_manifest(folder, manifest)  # after each engine, so a later failure keeps the earlier ones
        built.append(folder / opts.engine)
    return built


def build_or_script(path: str | Path, profiles: str | list[str], *, streams: int = 8, dla: int | None = None,
                    workspace_mb: int = DEFAULT_WORKSPACE_MB, console: Any = None) -> list[Path]:
    """Build the engines here if TensorRT and a GPU exist; always write ``build_engines.sh``.

    The script is written even after a build, because an artifact is often built on a desktop
    GPU and copied to a Jetson, whose engines must be built there.
    """
    folder = resolve_artifact(path)
    manifest = load_manifest(folder)
    require_single_graph(manifest, "a TensorRT engine")
    profiles = split_names(profiles)
    options = [build_options(manifest, p, streams=streams, dla=dla, workspace_mb=workspace_mb) for p in profiles]
    script = write_script(folder, manifest, options)
    if tensorrt_ready():
        return [*build_engines(folder, profiles, streams=streams, dla=dla, workspace_mb=workspace_mb,
                               console=console), script]
    _log(console, f"TensorRT cannot build here ({trt_backend.why_unavailable()}), so no engine was built; "
                  f"run {shlex.quote(str(script))} (or `edge3d build`) on the device to build them.")
    return [script]
