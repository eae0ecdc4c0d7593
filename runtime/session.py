"""``Session``: load an artifact, own N streams' state, step frames, report memory and latency.

Everything here is numpy plus the chosen backend; torch is never imported, so a camera app
on a Jetson installs edge3d without the export extra and runs only this.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as backends
from .manifest import (
    ArtifactError,
    format_bytes,
    is_positive_int,
    load_manifest,
    memory_available,
    output_map,
    precision_entry,
)
from .preprocess import FramePreprocessor


class Stats:
    """Latency of recent steps (a bounded window) and totals since the session started."""

    def __init__(self, window: int = 10000) -> None:
        self.ms: deque[float] = deque(maxlen=window)
        self.frames = 0
        self.calls = 0

    def record(self, ms: float, frames: int) -> None:
        self.ms.append(ms)
        self.frames += frames
        self.calls += 1

    def summary(self) -> dict[str, float]:
        if not self.ms:
            return {"frames": self.frames, "calls": 0, "ms_p50": 0.0, "ms_p95": 0.0, "ms_p99": 0.0,
                    "ms_mean": 0.0, "fps": 0.0}
        a = np.asarray(self.ms)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        frames_per_call = self.frames / max(self.calls, 1)
        return {"frames": self.frames, "calls": self.calls, "ms_p50": float(p50), "ms_p95": float(p95),
                "ms_p99": float(p99), "ms_mean": float(a.mean()),
                "fps": float(1000.0 * frames_per_call / a.mean()) if a.mean() > 0 else 0.0}

    def __repr__(self) -> str:
        # what a REPL user looks for first: how many frames, how fast
        s = self.summary()
        return (f"Stats(frames={s['frames']}, calls={s['calls']}, ms_p50={s['ms_p50']:.3f}, "
                f"ms_p95={s['ms_p95']:.3f}, ms_p99={s['ms_p99']:.3f}, fps={s['fps']:.1f})")


def _profile_of(path: Path, profile: str | None, manifest: dict[str, Any]) -> str:
    """The precision to run: the one asked for, else that of the ONNX file given as the path, else fp32.

    ``Session("x.edge3d/model.fp16.onnx")`` ran the fp32 graph without a word, since the file only
    located the artifact; a file and a profile that disagree are refused rather than one winning.
    """
    if isinstance(profile, str) and profile.endswith(".toml") and Path(profile).expanduser().is_file():
        from ..profiles import load_profile  # the file exported with names its graph inside: run that

        profile = load_profile(Path(profile).expanduser()).name
    own = next((name for name, e in manifest["precisions"].items()
                if isinstance(e, dict) and path.name in (e.get("file"), *e.get("files", ()))), None)
    if path.suffix != ".onnx" or own is None:
        return "fp32" if profile is None else profile
    if profile is not None and profile != own:
        raise ValueError(f"{path.name} is the {own} graph, but profile {profile!r} was asked for; pass the "
                         f"artifact folder with that profile, or leave the profile out to run {own}.")
    return own


def _pick_backend(requested: str, manifest: dict[str, Any], profile: str) -> str:
    """TensorRT where it can run (package, pycuda, a GPU, an engine for the profile), else ONNX Runtime.

    ``auto`` falls back silently, because the same app runs on a laptop and on the Jetson; an
    explicit ``tensorrt`` fails here, at load, with the reason, never mid-stream.
    """
    if requested not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {requested!r}; choose auto, onnxruntime or tensorrt.")
    from .backend.trt import gpu_available, has_engine, why_unavailable

    have = backends.available()
    if requested == "tensorrt":
        if "tensorrt" not in have or not gpu_available():
            raise ArtifactError(
                f"backend 'tensorrt' needs the tensorrt and pycuda packages and an NVIDIA GPU, and here "
                f"{why_unavailable()}; use the onnxruntime backend (--backend onnxruntime, backend='onnxruntime' "
                "in Python), or run on a device with TensorRT and pycuda installed."
            )
        return "tensorrt"
    if requested == "auto" and "tensorrt" in have and has_engine(manifest, profile) and gpu_available():
        return "tensorrt"
    if "onnxruntime" not in have:
        raise ArtifactError("no runtime backend is installed; pip install onnxruntime (or edge3d[tensorrt]).")
    return "onnxruntime"


def check_frame_count(frames: Any, streams: int) -> None:
    """One frame per stream of the call, in a list or an array: a generator would be used up by a
    check and then step nothing."""
    if not hasattr(frames, "__len__"):
        raise ValueError(f"frames is a {type(frames).__name__}; pass a list or an array of frames, one per "
                         "stream id.")
    if len(frames) != streams:
        raise ValueError(f"got {len(frames)} frames for {streams} streams; pass one frame per stream id.")


def require_mapping(snapshot: Any) -> None:
    """A snapshot is what get_state() returned; anything else fails before a state is touched."""
    if not isinstance(snapshot, Mapping):
        raise ValueError(f"snapshot is a {type(snapshot).__name__}; pass the dict get_state() returned.")


def require_only_states(snapshot: Mapping, states: Any) -> None:
    """A snapshot naming states this artifact lacks was taken from another artifact. Where its other
    names and shapes happened to match (a model whose first conv has the same cache), it was restored
    in part without a word, and the stream went on from another model's state."""
    extra = [str(k) for k in snapshot if k not in states]
    if extra:
        raise ValueError(f"snapshot holds {', '.join(map(repr, extra[:3]))}{' ...' if len(extra) > 3 else ''}, "
                         "which this artifact has no state of: it was taken from another artifact; pass a dict "
                         "from get_state() of a session of this one.")


def serialised(method: Any) -> Any:
    """One call at a time per session, from any number of threads.

    Every stream's state lives in shared buffers with one ping-pong parity, frames are staged in
    one buffer, and ONNX Runtime releases the GIL while it runs. Two threads stepping one session
    at once (say, a thread per camera, each on its own stream id) swapped the parity under each
    other and read each other's staging: the outputs were silently wrong (max error 0.4-0.6 on
    d-resnet18), and with ``max_batch`` the process crashed. A re-entrant lock costs well under a
    microsecond against a step of milliseconds. For throughput across cameras, batch them with
    ``step_batch`` or give each its own session. A closed session refuses every call but
    ``close`` (its buffers and graphs are released).
    """
    closing = method.__name__ == "close"

    @functools.wraps(method)
    def locked(self: Session, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed:
                if closing:
                    return None
                raise ValueError(f"{method.__name__}() on a closed session; open a new Session to go on "
                                 "streaming.")
            result = method(self, *args, **kwargs)
            if closing:
                self._closed = True
            return result

    return locked


def check_streams_fit(manifest: dict[str, Any], streams: int) -> None:
    """Refuse a stream count whose buffers cannot fit in the free memory, before allocating them.

    A million streams asked numpy for 26 GiB of frame buffer and failed with a traceback; a count
    just under the machine's memory would be granted and then swap or be killed as it was touched.
    Counted per stream: the states twice (ping-pong), stage buffers, one frame and one output.
    """
    available = memory_available()
    if available is None:
        return
    f = manifest["frame"]
    per_stream = (2 * sum(s["bytes"] for s in manifest["states"]) + sum(b["bytes"] for b in manifest.get("buffers", []))
                  + 4 * f["channels"] * f["height"] * f["width"] + 4 * int(np.prod(manifest["output"]["shape"][1:])))
    if streams * per_stream > available:
        raise ValueError(f"streams={streams} needs {streams * per_stream / 1e9:,.1f} GB of buffers "
                         f"({format_bytes(per_stream)} per stream), more than the {available / 1e9:.1f} GB of "
                         "memory free here; use fewer streams per session.")


class Session:
    """Stream frames through an exported artifact.

    ``Session(path, profile=None, backend="auto", streams=1)``: ``profile`` left out runs the
    precision of the ``.onnx`` file given as ``path``, else fp32. ``step(frame)`` takes an
    H×W×3 uint8 RGB image (resized and normalised from the manifest; a one-channel model's also
    H×W grey, and converts RGB to grey) or a normalised C×H×W float32 array. A rejected frame
    raises ``ValueError`` and changes no state.
    ``max_batch`` (ONNX Runtime) runs calls over many streams in chunks of at most that many
    rows, so each extra stream costs about its state bytes instead of two state sets plus
    activations (see ``runtime/backend/onnxrt.py``); leave it None for a few streams.
    ``spin=False`` (ONNX Runtime) lets its pool threads sleep when a run ends: for several sessions
    stepped in turn in one process, whose spinning threads otherwise compete (see ``_load_session``).
    Threads may share a session: its calls run one at a time (see ``serialised``).
    """

    def __new__(cls, path: str | Path, *args: Any, **kwargs: Any) -> Session:
        # Multi-rate artifacts (manifest "stages") are scheduled by runtime/staged.py.
        if cls is Session and "stages" in load_manifest(path):
            from .staged import StagedSession

            return super().__new__(StagedSession)
        return super().__new__(cls)

    def __init__(self, path: str | Path, profile: str | None = None, backend: str = "auto", streams: int = 1,
                 threads: int | None = None, max_batch: int | None = None, spin: bool = True) -> None:
        self._open(path, profile, streams)
        profile = self.profile
        self.backend_name = _pick_backend(backend, self.manifest, profile)
        options: dict[str, Any] = {}
        if self.backend_name == "onnxruntime":
            options = {"threads": threads, "max_batch": max_batch, "spin": spin}
        elif max_batch is not None:
            raise ValueError("max_batch (stepping many streams in chunks) is an ONNX Runtime option; on TensorRT "
                             "build the engine for the streams you need (`edge3d build --streams N`) instead.")
        elif spin is not True:
            raise ValueError("spin (whether ONNX Runtime's threads spin between runs) is an ONNX Runtime option; "
                             "TensorRT has no such threads, so leave it out.")
        self._backend = backends.create(self.backend_name, self.manifest, profile, self.streams, **options)

    def _open(self, path: str | Path, profile: str | None, streams: int) -> None:
        """What every session has, whatever schedules its graphs: manifest, precision, preprocessing, stats."""
        if not is_positive_int(streams):
            raise ValueError(f"streams must be a positive integer, got {streams!r}.")
        self.manifest = load_manifest(path)
        self.path = Path(path)
        self.profile = profile = _profile_of(Path(path).expanduser(), profile, self.manifest)
        self.precision = precision_entry(self.manifest, profile)
        self.streams = int(streams)
        check_streams_fit(self.manifest, self.streams)
        self.pre = FramePreprocessor(self.manifest["frame"])
        self.stats = Stats()
        self._lock = threading.RLock()
        self._closed = False
        self.classes: list[str] | None = self.manifest["output"].get("classes")

    # ----------------------------------------------------------------- stepping
    @serialised
    def step(self, frame: np.ndarray, stream: int = 0) -> np.ndarray:
        """One frame of one stream; returns that stream's output for the frame."""
        self._check_stream(stream)
        if self.streams == 1:
            buf = self._backend.frame_buffer
            self.pre(frame, buf[0])
            t0 = time.perf_counter()
            out = self._backend.step_all(buf)
            self.stats.record((time.perf_counter() - t0) * 1e3, 1)
            return out[0]
        return self.step_batch([frame], [stream])[0]

    @serialised
    def step_batch(self, frames: Any, stream_ids: Any = None) -> np.ndarray:
        """One frame for each stream in ``stream_ids`` (default: all, in order), as one call.

        Any subset of streams may be stepped, in any order; the others keep their state.
        Returns outputs in the order of ``stream_ids``. Ids and every frame are validated
        before the backend runs, so a rejected call changes no stream's state.
        """
        ids = self._check_ids(stream_ids)
        check_frame_count(frames, len(ids))
        everyone = len(ids) == self.streams and bool((ids == np.arange(self.streams)).all())
        buf = self._backend.frame_buffer if everyone else self._backend.subset_frame_buffer(len(ids))
        # Straight into the backend's frame buffer: it holds no state, and every call
        # rewrites all of its rows, so a frame rejected half-way leaves nothing behind.
        self._preprocess(frames, ids, buf)
        t0 = time.perf_counter()
        out = self._backend.step_all(buf) if everyone else self._backend.step_rows(buf, ids)
        self.stats.record((time.perf_counter() - t0) * 1e3, len(ids))
        return out

    def _preprocess(self, frames: Any, ids: np.ndarray, buf: np.ndarray) -> None:
        """Each frame into its row of ``buf``; with several cameras in one call, a rejected frame
        names its stream, since the message alone would not say whose it was."""
        for i, f in enumerate(frames):
            try:
                self.pre(f, buf[i])
            except ValueError as e:
                if len(ids) == 1:
                    raise
                raise ValueError(f"stream {int(ids[i])} (frame {i} of the call): {e}") from None

    def _check_ids(self, stream_ids: Any) -> np.ndarray:
        if stream_ids is None:
            return np.arange(self.streams)
        ids = np.asarray(stream_ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("stream_ids must be a non-empty list of stream indices.")
        if ids.dtype.kind not in "iu":  # bools would become masks and floats truncate silently
            raise ValueError(f"stream_ids {ids.tolist()} must be integers; pass stream indices 0..{self.streams - 1}.")
        for s in ids.tolist():
            self._check_stream(s)
        if len(set(ids.tolist())) != len(ids):
            raise ValueError(f"stream_ids {ids.tolist()} repeat a stream; step each stream at most once per call.")
        return ids.astype(np.intp)

    def _check_stream(self, stream: Any) -> None:
        if isinstance(stream, (bool, np.bool_)) or not isinstance(stream, (int, np.integer)):
            raise ValueError(f"stream id {stream!r} is a {type(stream).__name__}, not an integer; pass a stream "
                             f"index 0..{self.streams - 1}.")
        if not 0 <= int(stream) < self.streams:
            raise ValueError(f"stream id {stream!r} is out of range; this session has streams 0..{self.streams - 1}.")

    # ----------------------------------------------------------------- state
    @serialised
    def reset(self, stream: int | None = None) -> None:
        """Back to the initial state: one stream, or all of them."""
        if stream is None:
            rows = np.arange(self.streams)
        else:
            self._check_stream(stream)
            rows = np.asarray([int(stream)])
        self._backend.reset_rows(rows)

    def state_dtypes(self) -> dict[str, np.dtype]:
        """The dtype of each array :meth:`get_state` returns, in this precision (float16 states of an fp16
        profile, int8 ones of int8-lowmem): what a snapshot converted from another precision must take."""
        return self._backend.state_dtypes()

    def _snapshot(self) -> dict[str, np.ndarray]:
        return self._backend.read_states()

    @serialised
    def get_state(self, stream: int | None = None) -> dict[str, np.ndarray]:
        """A snapshot of every stream's state, or of one stream's (leading axis 1); ``set_state``
        restores it bit for bit.

        One stream alone is what a multi-camera server saves when it pauses a camera or moves it to
        another session, without touching the cameras still streaming. A multi-rate session's snapshot
        also holds its stage buffers, each stream's frame count (``frame_index``) and newest output: they
        say where in its cycle a stream stands (runtime/staged.py).
        """
        snap = self._snapshot()
        if stream is None:
            return snap
        self._check_stream(stream)
        k = int(stream)
        return {n: a[k:k + 1].copy() for n, a in snap.items()}

    @serialised
    def set_state(self, snapshot: dict[str, np.ndarray], stream: int | None = None) -> None:
        """Restore a snapshot of every stream, or with ``stream`` a one-stream snapshot into that stream
        (taken from any session of the same artifact and profile); the other streams are left alone."""
        require_mapping(snapshot)
        if stream is not None:
            self._check_stream(stream)
        rows = self.streams if stream is None else 1
        source = ("a snapshot of a session with the same artifact, profile and streams" if stream is None else
                  "a one-stream snapshot, get_state(stream=k), of a session with the same artifact and profile")
        dtypes = self._backend.state_dtypes()
        require_only_states(snapshot, dtypes)
        for s in self.manifest["states"]:
            name = s["name"]
            if name not in snapshot:
                raise ValueError(f"snapshot lacks state {name!r}; pass a dict from get_state() of this artifact.")
            a = np.asarray(snapshot[name])
            want = (rows, *[int(d) for d in s["shape"][1:]])
            if a.shape != want or a.dtype != dtypes[name]:
                raise ValueError(
                    f"snapshot state {name!r} is {a.dtype}{list(a.shape)}, expected {dtypes[name]}{list(want)}; "
                    f"pass {source}."
                )
        if stream is None:
            self._backend.write_states({n: np.asarray(snapshot[n]) for n in dtypes})
            return
        states = self._backend.read_states()  # the other streams' rows go back as they were
        for n in dtypes:
            states[n][int(stream)] = np.asarray(snapshot[n])[0]
        self._backend.write_states(states)

    # ----------------------------------------------------------------- reporting
    @property
    def has_output(self) -> bool:
        """Whether ``step`` returns a prediction yet: always, for a single-rate model (a multi-rate
        one predicts nothing until its slowest stage first runs, see runtime/staged.py)."""
        return True

    def frame_ms(self) -> np.ndarray:
        """ms of each recent call; a multi-rate session's are whole cycles of its stages, each over its
        frames (see runtime/staged.py)."""
        return np.asarray(self.stats.ms)

    def latency(self) -> dict[str, Any]:
        """ms per call at the 50th, 95th and 99th percentiles (``p50``, ``p95``, ``p99``): what `edge3d
        run` and the Jetson app report. ``cycles`` says they were taken over whole cycles of a
        multi-rate model's stages (runtime/staged.py overrides this)."""
        s = self.stats.summary()
        return {"p50": s["ms_p50"], "p95": s["ms_p95"], "p99": s["ms_p99"], "cycles": False}

    @property
    def has_outputs(self) -> np.ndarray:
        """:attr:`has_output` per stream, in stream order."""
        return np.ones(self.streams, bool)

    @property
    def state_breakdown(self) -> dict[str, int]:
        """Bytes per stream of each state, in this profile's dtypes."""
        dt = self._backend.state_dtypes()
        out = {}
        for s in self.manifest["states"]:
            n = 1
            for d in s["shape"][1:]:
                n *= int(d)
            out[s["name"]] = n * dt[s["name"]].itemsize
        return out

    @property
    def cache_bytes(self) -> int:
        """State bytes per stream (all states, input history included)."""
        return sum(self.state_breakdown.values())

    def top(self, output: np.ndarray) -> tuple[int, str, float]:
        """Top class of one output vector: (index, name, softmax score)."""
        return self.top_k(output, 1)[0]

    def top_k(self, output: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` most likely classes of one output vector, most likely first: (index, name, softmax
        score) each. Kinetics and UCF101 results are quoted as top-1 and top-5 accuracy; a near tie
        between two classes also shows here, where the top class alone hides it."""
        if not is_positive_int(k):
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        positions = output_map(self.manifest)
        if positions is not None:  # a class per position: one for the frame would be a pixel's
            shape = "×".join(map(str, self.manifest["output"]["shape"][1:]))
            raise ValueError(f"this artifact's output is a {shape} map per frame (a class at every position), not "
                             "a class vector, so it has no top class; take output.argmax(axis=0) for the class "
                             "at each position.")
        o = np.asarray(output, np.float64)
        if o.ndim > 1 and o.shape[0] != 1:
            # an argmax over several streams' outputs at once would name a class of no stream
            raise ValueError(f"top() and top_k() take one stream's output, got shape {o.shape}; for step_batch "
                             "outputs call them per row: [s.top(row) for row in outputs].")
        o = o.reshape(-1)
        size = int(np.prod(self.manifest["output"]["shape"][1:]))
        if o.size != size:  # another model's output would be named with this one's classes
            raise ValueError(f"top() and top_k() got {o.size} values, but this artifact's output has {size}; pass "
                             "the output of this session's step().")
        p = np.exp(o - o.max())
        p /= p.sum()
        # the first of equal scores first, and a NaN before any number, as argmax takes them
        order = np.argsort(np.where(np.isnan(o), -np.inf, -o), kind="stable")[:k]
        return [(int(i), self.class_name(int(i)), float(p[i])) for i in order]

    def class_name(self, index: int) -> str:
        """The name of class ``index``, or the index itself where the artifact names no classes."""
        return self.classes[index] if self.classes and index < len(self.classes) else str(index)

    @serialised
    def close(self) -> None:
        """Release the graphs and state buffers now, not when the object is collected."""
        self._backend.close()

    def __repr__(self) -> str:
        # no lock: a repr must never wait on (or fail during) another thread's step
        if not hasattr(self, "stats"):  # __init__ failed before _open: only the class is known
            return f"<{type(self).__name__}, not opened>"
        state = ", closed" if self._closed else ""
        try:
            cache = str(self.cache_bytes)
        except AttributeError:  # failed while loading its graphs
            cache = "?"
        return (f"{type(self).__name__}({str(self.path)!r}, profile={self.profile!r}, "
                f"backend={getattr(self, 'backend_name', '?')!r}, streams={self.streams}, "
                f"frames={self.stats.frames}, cache_bytes={cache}{state})")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
