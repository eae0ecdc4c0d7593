"""TensorRT backend: one engine, device-resident state buffers swapped by address each step.

Why it looks like this: the states of a streaming network are read and rewritten every frame, so
they stay on the GPU. Each state has two device buffers; parity p binds buffer p as
``state_in.*`` and buffer 1-p as ``state_out.*`` with ``set_tensor_address``, so a step copies no
state and never binds one buffer as both input and output. Only the frame goes up and the output
comes down, through pinned host buffers, on one CUDA stream (``execute_async_v3``). Because the
two parities are fixed address sets, each can optionally be captured once as a CUDA graph.

``tensorrt`` and ``pycuda`` are imported only when a backend is created (or ``gpu_available`` is
asked), so this module imports anywhere, including CI machines without a GPU.
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import ArtifactError, io_names, state_io_names
from .base import Backend


def gpu_available() -> bool:
    """True when tensorrt and pycuda import and CUDA sees a GPU; never raises.

    ``backend="auto"`` asks this before choosing TensorRT, so a machine with the packages but
    no usable GPU (CI, a container without the NVIDIA runtime) quietly stays on ONNX Runtime.
    """
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # ImportError, pycuda.driver.Error, a broken driver install...
        return False


def driver_gpu_count() -> int | None:
    """GPUs the NVIDIA driver reports, asked through libcuda itself: None where no driver is installed.

    Why not pycuda: the reason TensorRT is unavailable is often that pycuda is missing (JetPack
    ships the tensorrt package but not pycuda), and the user then still needs to know whether
    this machine has a GPU at all, i.e. whether installing the packages would help.
    """
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0  # a driver without a usable device (no GPU passed into the container, say)
    except AttributeError:  # a library of that name without the driver API
        return None
    return count.value


def why_unavailable() -> str:
    """What this machine lacks for TensorRT, as a clause: 'the pycuda package is not installed'.

    The errors that refuse TensorRT name the missing pieces rather than all three needs, so a
    Jetson user told only "pycuda" knows the fix is one pip install, and a GPU server without
    TensorRT is not told it lacks a GPU.
    """
    import importlib.util

    lacking = [name for name in ("tensorrt", "pycuda") if importlib.util.find_spec(name) is None]
    gpus = driver_gpu_count()
    parts = []
    if lacking:
        parts.append(f"the {' and '.join(lacking)} package{'s are' if len(lacking) > 1 else ' is'} not installed")
    if gpus is None:
        parts.append("no NVIDIA driver was found")
    elif gpus == 0:
        parts.append("the NVIDIA driver sees no GPU")
    elif not lacking:
        parts.append(f"CUDA could not be started through pycuda, though the driver reports {gpus} GPU(s)")
    return " and ".join(parts)


def gpu_name(index: int = 0) -> str:
    """The GPU's name and compute capability, recorded with an engine (engines are per device)."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(index)
    major, minor = dev.compute_capability()
    return f"{dev.name()} (sm_{major}{minor})"


def engine_path(manifest: dict[str, Any], profile: str) -> Path:
    """Where a profile's engine is: as recorded by ``edge3d build``, else ``model.<profile>.engine``.

    The fallback name is what ``build_engines.sh`` writes, which does not edit the manifest.
    """
    entry = manifest.get("engines", {}).get(profile, {})
    return Path(manifest["_folder"]) / entry.get("file", f"model.{profile}.engine")


def has_engine(manifest: dict[str, Any], profile: str) -> bool:
    """An engine file for the profile is there (recorded or not), so ``auto`` may try TensorRT."""
    return engine_path(manifest, profile).is_file()


class _Plan:
    """Device buffers for a batch of ``k`` streams: frame, output, and two buffers per state."""

    def __init__(self, backend: TensorRTBackend, k: int) -> None:
        cuda = backend.cuda
        self.k = k
        self.host_frame = cuda.pagelocked_empty((k, *backend.frame_shape), backend.frame_dtype)
        self.host_out = cuda.pagelocked_empty((k, *backend.output_shape), backend.output_dtype)
        self.frame = cuda.mem_alloc(self.host_frame.nbytes)
        self.out = cuda.mem_alloc(self.host_out.nbytes)
        self.states = [{n: cuda.mem_alloc(k * backend.row_bytes[n]) for n in backend.state_names} for _ in (0, 1)]

    def free(self) -> None:
        for buf in [self.frame, self.out, *self.states[0].values(), *self.states[1].values()]:
            buf.free()


class TensorRTBackend(Backend):
    """Steps N streams with a TensorRT engine built by ``edge3d build`` (or ``build_engines.sh``)."""

    name = "tensorrt"

    def __init__(self, manifest: dict[str, Any], profile: str, streams: int, cuda_graphs: bool = False,
                 device: int = 0) -> None:
        super().__init__(manifest, profile, streams)
        path = engine_path(manifest, profile)
        if not path.is_file():
            raise ArtifactError(
                f"the artifact has no TensorRT engine for {profile!r} ({path.name}); build it on this device "
                f"with `edge3d build {shlex.quote(str(manifest['_folder']))} --profile {profile}` or the artifact's build_engines.sh."
            )
        import pycuda.driver as cuda
        import tensorrt as trt

        self.cuda, self.trt = cuda, trt
        cuda.init()
        # TensorRT works in the device's primary context; make it current for our allocations.
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        self._subsets: dict[int, _Plan] = {}
        self._full: _Plan | None = None
        try:
            self.engine = self._deserialize(path)
            self.context = self.engine.create_execution_context()
            self._check_io()
            self.stream = cuda.Stream()
            self._full = _Plan(self, streams)
            self._parity = 0
            self._shape_k = 0
            self._bound: tuple[_Plan, int] | None = None  # the plan and parity the context addresses point at
            self.cuda_graphs = cuda_graphs
            self._graphs: dict[int, Any] = {}
            self.reset_rows(np.arange(streams))
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- loading
    def _deserialize(self, path: Path):
        trt = self.trt
        built = self.manifest.get("engines", {}).get(self.profile, {})
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            where = f" (built with TensorRT {built.get('tensorrt')} on {built.get('device')})" if built else ""
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot load {path.name}{where}; engines only run on the GPU and "
                f"TensorRT version they were built with, so rebuild it here with `edge3d build`."
            )
        return engine

    def _check_io(self) -> None:
        """Fail at load, not mid-stream, if the engine and the manifest disagree."""
        trt, engine = self.trt, self.engine
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            io[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, np.dtype(trt.nptype(
                engine.get_tensor_dtype(name))))
        self.state_names = [s["name"] for s in self.manifest["states"]]
        self._specs = {s["name"]: s for s in self.manifest["states"]}
        inputs, outputs = io_names(self.manifest)
        if {k for k, v in io.items() if v[0]} != inputs or {k for k, v in io.items() if not v[0]} != outputs:
            raise ArtifactError(
                f"engine for {self.profile!r} does not match manifest.json (its tensors: {sorted(io)[:4]}...); "
                "rebuild it from this artifact with `edge3d build`."
            )
        max_streams = engine.get_tensor_profile_shape("frame", 0)[2][0]
        if self.streams > max_streams:
            raise ArtifactError(
                f"the {self.profile!r} engine accepts at most {max_streams} streams, this session asks for "
                f"{self.streams}; rebuild it with `edge3d build ... --streams {self.streams}`."
            )
        f = self.manifest["frame"]
        self.frame_shape = (int(f["channels"]), int(f["height"]), int(f["width"]))
        self.frame_dtype = io["frame"][1]
        self.output_shape = tuple(int(d) for d in self.manifest["output"]["shape"][1:])
        self.output_dtype = io["output"][1]
        self._dtypes = {n: io[state_io_names(n)[0]][1] for n in self.state_names}
        self._shapes = {n: tuple(int(d) for d in self._specs[n]["shape"][1:]) for n in self.state_names}
        self.row_bytes = {n: int(np.prod(self._shapes[n])) * self._dtypes[n].itemsize for n in self.state_names}

    def _subset(self, k: int) -> _Plan:
        """Buffers for stepping k of the streams (their own, even for k == streams in another order)."""
        if k not in self._subsets:
            self._subsets[k] = _Plan(self, k)
        return self._subsets[k]

    # ----------------------------------------------------------------- running
    def _bind(self, plan: _Plan, parity: int) -> None:
        """Point the context at ``plan``'s buffers: states read from ``parity``, written to the other."""
        ctx = self.context
        if self._shape_k != plan.k:
            ctx.set_input_shape("frame", (plan.k, *self.frame_shape))
            for n in self.state_names:
                ctx.set_input_shape(state_io_names(n)[0], (plan.k, *self._shapes[n]))
            self._shape_k = plan.k
        if self._bound is not None and self._bound[0] is plan and self._bound[1] == parity:
            return
        ctx.set_tensor_address("frame", int(plan.frame))
        ctx.set_tensor_address("output", int(plan.out))
        for n in self.state_names:
            i, o = state_io_names(n)
            ctx.set_tensor_address(i, int(plan.states[parity][n]))
            ctx.set_tensor_address(o, int(plan.states[1 - parity][n]))
        self._bound = (plan, parity)

    def _enqueue(self, plan: _Plan) -> None:
        cuda = self.cuda
        cuda.memcpy_htod_async(plan.frame, plan.host_frame, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above.")
        cuda.memcpy_dtoh_async(plan.host_out, plan.out, self.stream)

    def _run(self, plan: _Plan, parity: int) -> None:
        """One step of ``plan`` reading states at ``parity``; the caller flips parity afterwards.

        With ``cuda_graphs``, a full-batch parity that has run once plainly (TensorRT wants one
        plain enqueue after a shape change before capture) is captured and replayed from then on:
        its addresses never change, which is what ping-pong by address buys.
        """
        self._bind(plan, parity)
        graph = self._graphs.get(parity) if plan is self._full else None
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._enqueue(plan)
        self.stream.synchronize()
        if self.cuda_graphs and plan is self._full and graph is None:
            self._capture(plan, parity)

    def _capture(self, plan: _Plan, parity: int) -> None:
        """Record this parity's copy-in, enqueue and copy-out as a CUDA graph; on failure run without graphs."""
        try:
            self.stream.begin_capture(self.cuda.capture_mode.THREAD_LOCAL)
            try:
                self._enqueue(plan)  # recorded, not run
            finally:
                captured = self.stream.end_capture()
            self._graphs[parity] = captured.instantiate()
        except Exception as e:  # the step itself already ran; only the speed-up is lost
            warnings.warn(f"CUDA graph capture failed ({e}); stepping without CUDA graphs.", stacklevel=3)
            self.cuda_graphs = False

    @property
    def frame_buffer(self) -> np.ndarray:
        """Pinned host buffer for all streams' frames; the Session preprocesses straight into it."""
        return self._full.host_frame

    def subset_frame_buffer(self, k: int) -> np.ndarray:
        return self._subset(k).host_frame

    def state_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    def step_all(self, frames: np.ndarray) -> np.ndarray:
        plan = self._full
        if frames is not plan.host_frame:
            plan.host_frame[...] = frames
        self._run(plan, self._parity)
        self._parity ^= 1
        return plan.host_out.copy()

    def step_rows(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Gather the rows' states into a k-stream plan, step it, scatter back only on success."""
        plan, cur, cuda = self._subset(len(rows)), self._full.states[self._parity], self.cuda
        self._graphs.clear()  # the context is about to be reshaped; recapture the full batch later
        if frames is not plan.host_frame:
            plan.host_frame[...] = frames
        for n in self.state_names:
            rb = self.row_bytes[n]
            for i, r in enumerate(np.asarray(rows).tolist()):
                cuda.memcpy_dtod_async(int(plan.states[0][n]) + i * rb, int(cur[n]) + r * rb, rb, self.stream)
        self._run(plan, 0)
        for n in self.state_names:
            rb = self.row_bytes[n]
            for i, r in enumerate(np.asarray(rows).tolist()):
                cuda.memcpy_dtod_async(int(cur[n]) + r * rb, int(plan.states[1][n]) + i * rb, rb, self.stream)
        self.stream.synchronize()
        return plan.host_out.copy()

    # ----------------------------------------------------------------- state
    def reset_rows(self, rows: np.ndarray) -> None:
        cur = self._full.states[self._parity]
        for n in self.state_names:
            init = np.full(self._shapes[n], self._specs[n].get("init", 0.0), self._dtypes[n])
            for r in np.asarray(rows).tolist():
                self.cuda.memcpy_htod(int(cur[n]) + r * self.row_bytes[n], init)

    def read_states(self) -> dict[str, np.ndarray]:
        self.stream.synchronize()
        cur = self._full.states[self._parity]
        out = {}
        for n in self.state_names:
            out[n] = np.empty((self.streams, *self._shapes[n]), self._dtypes[n])
            self.cuda.memcpy_dtoh(out[n], cur[n])
        return out

    def write_states(self, states: dict[str, np.ndarray]) -> None:
        self.stream.synchronize()
        cur = self._full.states[self._parity]
        for n in self.state_names:
            self.cuda.memcpy_htod(cur[n], np.ascontiguousarray(states[n], self._dtypes[n]))

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        self._graphs = {}
        for plan in [self._full, *self._subsets.values()]:
            if plan is not None:
                plan.free()
        self._full, self._subsets, self._bound = None, {}, None
        self.stream = self.context = self.engine = None  # released while their CUDA context is current
        self._ctx.pop()
        self._ctx = None
