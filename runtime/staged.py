"""Scheduler for multi-rate artifacts: one ONNX graph per stage, buffers between them.

Every frame runs stage 0; stage k runs when its input buffers are full, i.e. at frames t with
(t + 1) mod P_k == 0 (P_k = the stage's ``rate``, frames per run). Stage k's feed outputs are
written into slot ((t + 1) / P_k − 1) mod s_{k+1} of the next stage's buffers, so a full buffer
holds the last s frames oldest first, exactly as the exporter's PyTorch scheduler does.
``step`` returns the newest output and ``last_fresh`` says whether this frame produced it.

Every precision is a graph per stage (``stage<k>.<profile>.onnx``): states and the buffers between
stages take the dtypes that precision's graphs give them (float16 in FP16, int8 with their scales in
int8-lowmem), read off the graphs' inputs at load.

numpy + onnxruntime only (never torch). All streams share one phase: multi-rate artifacts step
all streams together.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .backend.onnxrt import _ORT_TYPES, check_state_dtypes, initial_value
from .manifest import ArtifactError, buffer_of_feed, check_file_hash, output_period, state_io_names
from .session import Session, check_frame_count, require_mapping, require_only_states, serialised


class StagedSession(Session):
    """A :class:`Session` over an artifact whose manifest has ``stages`` (see the module doc)."""

    def __init__(self, path: str | Path, profile: str | None = None, backend: str = "auto", streams: int = 1,
                 threads: int | None = None, max_batch: int | None = None, spin: bool = True) -> None:
        from .backend.onnxrt import _load_session

        if max_batch is not None:
            raise ValueError("max_batch is not supported for multi-rate artifacts (all streams share one phase); "
                             "leave it out.")
        if backend not in ("auto", "onnxruntime"):
            raise ArtifactError(f"multi-rate artifacts run on onnxruntime only for now, not {backend!r}; "
                                "use the onnxruntime backend (--backend onnxruntime, backend='onnxruntime' in "
                                "Python).")
        self._open(path, profile, streams)
        profile = self.profile
        if "files" not in self.precision:
            raise ArtifactError(f"the {profile!r} precision of this multi-rate artifact lists no per-stage files; "
                                "re-export it.")
        self.backend_name = "onnxruntime"
        folder = Path(self.manifest["_folder"])
        self._stages = self.manifest["stages"]
        self._specs = {s["name"]: s for s in self.manifest["states"]}
        self._buffers_spec = {b["name"]: b for b in self.manifest.get("buffers", [])}
        self._sess = []
        self._types: dict[str, np.dtype] = {}  # every stage's graph inputs: states, buffers, the frame
        hashes = self.precision.get("sha256") or [None] * len(self.precision["files"])
        for st, file, sha in zip(self._stages, self.precision["files"], hashes, strict=True):
            sess = _load_session(folder / file, threads, spin)
            want_in = [i["name"] for i in st["inputs"]] + [state_io_names(n)[0] for n in st["states"]]
            want_out = [o["name"] for o in st["outputs"]] + [state_io_names(n)[1] for n in st["states"]]
            got_in, got_out = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
            if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
                raise ArtifactError(f"{file} does not match stage {st['index']} of manifest.json; re-export the "
                                    "artifact instead of mixing files.")
            self._types.update({i.name: np.dtype(_ORT_TYPES[i.type]) for i in sess.get_inputs()})
            check_state_dtypes({n: self._types[state_io_names(n)[0]] for n in st["states"]}, self.precision,
                               folder / file)
            check_file_hash(folder / file, sha)
            fixed = next(((i.name, i.shape[0]) for i in sess.get_inputs()
                          if isinstance(i.shape[0], int) and i.shape[0] != streams), None)
            if fixed:
                name, b = fixed
                raise ValueError(f"stage {st['index']} of this artifact takes a batch of exactly {b} ({name}), so one "
                                 f"session cannot hold {streams} streams; re-export it (SGS stages exported before "
                                 "edge3d traced stages on two streams took one), or open one Session per stream.")
            self._sess.append((sess, got_out))
        self._stage_ms: list[deque[float]] = [deque(maxlen=10000) for _ in self._stages]
        self._bins: deque[np.ndarray] = deque(maxlen=10000)
        # ms of each whole cycle of the stages (output_period frames from one output of the slowest stage
        # to the next): per-frame percentiles of a multi-rate model time stage 0 alone on most frames
        self.cycle_ms: deque[float] = deque(maxlen=10000)
        self.last_fresh = False
        self.last_extras: dict[str, np.ndarray] = {}
        # (stage, feeds) of the stages the last step ran, for INT8 calibration (exporters/calibration.py)
        self.keep_feeds = False
        self.last_feeds: list[tuple[int, dict[str, np.ndarray]]] = []
        self._init_all()

    def state_dtypes(self) -> dict[str, np.dtype]:
        """The dtype of everything :meth:`get_state` returns: each state's and each buffer's in this
        precision, the frame index's and the last output's."""
        out = {n: self._types[state_io_names(n)[0]] for n in self._specs}
        out.update({n: self._types[n] for n in self._buffers_spec})
        return {**out, "frame_index": np.dtype(np.int64), "last_output": np.dtype(np.float32)}

    # ------------------------------------------------------------------ state
    def _init_all(self) -> None:
        k = self.streams
        dtypes = self.state_dtypes()
        self._states = {n: np.full((k, *[int(d) for d in s["shape"][1:]]),
                                   initial_value(s, self.precision, dtypes[n]), dtypes[n])
                        for n, s in self._specs.items()}
        self._buf = {n: np.zeros((k, *[int(d) for d in b["shape"][1:]]), dtypes[n])
                     for n, b in self._buffers_spec.items()}
        self._t = 0
        self._cycle = [0.0, 0]  # ms and frames stepped since the slowest stage last ran
        self._last = np.zeros((k, *[int(d) for d in self.manifest["output"]["shape"][1:]]), np.float32)
        self.last_fresh = False

    @property
    def has_output(self) -> bool:
        """Whether the slowest stage has run since the start (or the restored snapshot's start):
        before that, ``step`` returns zeros, which are no prediction."""
        return self._t >= output_period(self.manifest)

    def top_k(self, output: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
        """As :meth:`Session.top_k`, refused before the first output: the zeros ``step`` returns then
        would name the first class at a uniform score, a prediction the model never made."""
        if not self.has_output:
            rate = output_period(self.manifest)
            raise ValueError(f"this multi-rate session has no prediction yet: its slowest stage first runs on "
                             f"frame {rate} of each clip, counting from 1, and until then step returns zeros; call "
                             "top() once has_output is True.")
        return super().top_k(output, k)

    @serialised
    def reset(self, stream: int | None = None) -> None:
        """Back to the initial state. All streams share one phase, so only a full reset exists."""
        self._whole_phase(stream, "reset")
        self._init_all()

    def _whole_phase(self, stream: int | None, what: str) -> None:
        """A stream id is accepted only where it means every stream: all streams share one phase."""
        if stream is not None and self.streams > 1:
            raise ValueError(f"multi-rate artifacts keep all streams in one phase; call {what}() for all streams.")
        if stream is not None:
            self._check_stream(stream)

    @serialised
    def get_state(self, stream: int | None = None) -> dict[str, np.ndarray]:
        self._whole_phase(stream, "get_state")
        snap = {n: a.copy() for n, a in self._states.items()}
        snap.update({n: a.copy() for n, a in self._buf.items()})
        snap["frame_index"] = np.asarray([self._t], np.int64)
        snap["last_output"] = self._last.copy()
        return snap

    @serialised
    def set_state(self, snapshot: dict[str, np.ndarray], stream: int | None = None) -> None:
        require_mapping(snapshot)
        self._whole_phase(stream, "set_state")
        current = self.get_state()
        require_only_states(snapshot, current)
        for n, a in current.items():
            got = np.asarray(snapshot[n]) if n in snapshot else None
            if got is None or got.shape != a.shape or (got.dtype != a.dtype and n != "frame_index"):
                raise ValueError(f"snapshot lacks state {n!r} or has the wrong shape or dtype ({a.dtype}{list(a.shape)} "
                                 "here); pass a dict from get_state() of a session with the same artifact, profile "
                                 "and streams.")
        for n in self._states:
            self._states[n][...] = snapshot[n]
        for n in self._buf:
            self._buf[n][...] = snapshot[n]
        self._t = int(np.asarray(snapshot["frame_index"]).reshape(-1)[0])
        self._cycle = [0.0, 0]  # a cycle cut by the restore is not counted
        self._last[...] = snapshot["last_output"]

    @property
    def state_breakdown(self) -> dict[str, int]:
        """Bytes per stream of every stage's states and every buffer between stages."""
        out = {n: int(a[0].nbytes) for n, a in self._states.items()}
        out.update({n: int(a[0].nbytes) for n, a in self._buf.items()})
        return out

    # ------------------------------------------------------------------ stepping
    @serialised
    def step(self, frame: np.ndarray, stream: int = 0) -> np.ndarray:
        """One frame; returns the newest output (``last_fresh``: produced by this frame)."""
        self._check_stream(stream)
        if self.streams != 1:
            raise ValueError("multi-rate artifacts step all streams together; use step_batch(frames).")
        return self.step_batch([frame])[0]

    @serialised
    def step_fresh(self, frame: np.ndarray, stream: int = 0) -> tuple[np.ndarray, bool]:
        out = self.step(frame, stream)
        return out, self.last_fresh

    @serialised
    def step_batch(self, frames: Any, stream_ids: Any = None) -> np.ndarray:
        ids = np.arange(self.streams) if stream_ids is None else np.asarray(stream_ids)
        if ids.ndim != 1 or len(ids) != self.streams or not (ids == np.arange(self.streams)).all():
            raise ValueError("multi-rate artifacts step all streams together (one phase); pass every stream in order.")
        check_frame_count(frames, self.streams)
        f = self.manifest["frame"]
        staged = np.empty((self.streams, f["channels"], f["height"], f["width"]), np.float32)
        self._preprocess(frames, ids, staged)  # every frame validated before any state changes
        t0 = time.perf_counter()
        self._advance(staged.astype(self._types["frame"], copy=False))  # a profile with float16 io takes float16
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.record(ms, self.streams)
        self._cycle = [self._cycle[0] + ms, self._cycle[1] + 1]
        if self.last_fresh:
            if self._cycle[1] == output_period(self.manifest):
                self.cycle_ms.append(self._cycle[0])
            self._cycle = [0.0, 0]
        return self._last.copy()

    def _feeds(self, k: int, frame: np.ndarray, bufs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage k's graph inputs: the frame (stage 0) or its buffers, and its states."""
        st = self._stages[k]
        feeds = {"frame": frame} if k == 0 else {i["name"]: bufs[i["name"]] for i in st["inputs"]}
        feeds.update({state_io_names(n)[0]: self._states[n] for n in st["states"]})
        return feeds

    def _advance(self, frame: np.ndarray) -> None:
        t = self._t
        new_states: dict[str, np.ndarray] = {}
        writes: list[tuple[str, int, np.ndarray]] = []
        bufs = dict(self._buf)
        fresh, last, extras = False, None, {}
        timings: list[tuple[int, float]] = []
        ran: list[tuple[int, dict[str, np.ndarray]]] = []
        for k, st in enumerate(self._stages):
            if (t + 1) % st["rate"]:
                break
            sess, out_names = self._sess[k]
            feeds = self._feeds(k, frame, bufs)
            t0 = time.perf_counter()
            res = dict(zip(out_names, sess.run(None, feeds), strict=True))
            timings.append((k, (time.perf_counter() - t0) * 1e3))
            if self.keep_feeds:  # every array in feeds is replaced below, never written in place
                ran.append((k, feeds))
            for n in st["states"]:
                new_states[n] = res[state_io_names(n)[1]]
            if k + 1 < len(self._stages):
                nxt = self._stages[k + 1]
                slot = ((t + 1) // st["rate"] - 1) % nxt["stride"]
                for o in st["outputs"]:
                    name = buffer_of_feed(o["name"])
                    y = res[o["name"]]
                    c = y.shape[1]
                    buf = bufs[name].copy()  # commit only after every stage ran
                    buf[:, slot * c:(slot + 1) * c] = y
                    bufs[name] = buf
                    writes.append((name, slot, y))
            else:
                fresh, last = True, res["output"]
                extras = {o["name"]: res[o["name"]] for o in st["outputs"][1:]}
        # commit
        for n, a in new_states.items():
            self._states[n] = a
        for n in {w[0] for w in writes}:
            self._buf[n] = bufs[n]
        for k, ms in timings:
            self._stage_ms[k].append(ms)
        if fresh:
            self._last = np.asarray(last, np.float32)
            self.last_extras = extras
            if "bins_used" in extras:
                self._bins.append(np.asarray(extras["bins_used"]).reshape(-1))
        self.last_fresh = fresh
        self.last_feeds = ran
        self._t = t + 1

    def bare_cycle(self) -> Any:
        """A callable that runs one cycle of the stage graphs as plain ``InferenceSession.run`` calls:
        each stage as often and in the order the schedule runs it, on fixed inputs (a zero frame, the
        current states and buffers), with nothing kept. ``edge3d bench`` times it beside a cycle of
        :meth:`step` calls, so the difference is what the scheduler adds (stacking buffers, states,
        bookkeeping), as the bare call measures it for a single graph."""
        f = self.manifest["frame"]
        frame = np.zeros((self.streams, f["channels"], f["height"], f["width"]), self._types["frame"])
        runs = []
        for k, st in enumerate(self._stages):
            runs.append((st["rate"], self._sess[k][0], self._feeds(k, frame, self._buf)))
        period = output_period(self.manifest)

        def call(_: int = 0) -> None:
            for t in range(period):
                for rate, sess, feeds in runs:
                    if (t + 1) % rate:
                        break
                    sess.run(None, feeds)
        return call

    # ------------------------------------------------------------------ reporting
    def stage_summary(self) -> dict[str, Any]:
        """ms per run of each stage, amortised ms/frame, buffer bytes, and SGS bins used."""
        rows = []
        amortised = 0.0
        for st, ms in zip(self._stages, self._stage_ms, strict=True):
            mean = float(np.mean(ms)) if ms else 0.0
            amortised += mean / st["rate"]
            rows.append({"stage": st["index"], "file": st["file"], "rate": st["rate"], "runs": len(ms),
                         "ms_per_run": mean})
        out: dict[str, Any] = {"stages": rows, "amortised_ms_per_frame": amortised,
                               "buffer_bytes": {n: int(a[0].nbytes) for n, a in self._buf.items()}}
        if self._bins:
            b = np.concatenate(list(self._bins))
            out["bins_used"] = {"mean": float(b.mean()), "min": int(b.min()), "max": int(b.max()),
                                "chunks": int(b.size)}
        return out

    @serialised
    def close(self) -> None:
        self._sess = []
