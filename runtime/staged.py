"""Scheduler for multi-rate artifacts: one ONNX graph per stage, buffers between them.

Every frame runs stage 0; stage k runs when its input buffers are full, i.e. at frames t with
(t + 1) mod P_k == 0 (P_k = the stage's ``rate``, frames per run). Stage k's feed outputs are
written into slot ((t + 1) / P_k − 1) mod s_{k+1} of the next stage's buffers, so a full buffer
holds the last s frames oldest first, exactly as the exporter's PyTorch scheduler does.
``step`` returns the newest output and ``last_fresh`` says whether this frame produced it.

Each stream keeps its own frame count, so streams are as independent as a single-rate session's:
a call may step any subset of them, in any order, one stream may be reset or restored alone, and a
camera that joins later runs its stages on its own frames. A call runs stage k on the rows whose
count reaches the stage's rate; all streams in step (the usual case) run each stage as one batch.

Every precision is a graph per stage (``stage<k>.<profile>.onnx``): states and the buffers between
stages take the dtypes that precision's graphs give them (float16 in FP16, int8 with their scales in
int8-lowmem), read off the graphs' inputs at load.

numpy + onnxruntime only (never torch).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .backend.onnxrt import _ORT_TYPES, check_state_dtypes, chunk_rows, initial_value
from .manifest import ArtifactError, buffer_of_feed, check_file_hash, output_period, state_io_names
from .session import Session, check_frame_count, require_mapping, require_only_states, serialised


def _all_rows(a: np.ndarray) -> np.ndarray:
    return a


def _rows_of(streams: np.ndarray) -> Any:
    return lambda a: a[streams]


class StagedSession(Session):
    """A :class:`Session` over an artifact whose manifest has ``stages`` (see the module doc)."""

    def __init__(self, path: str | Path, profile: str | None = None, backend: str = "auto", streams: int = 1,
                 threads: int | None = None, max_batch: int | None = None, spin: bool = True) -> None:
        from .backend.onnxrt import _load_session

        if backend not in ("auto", "onnxruntime"):
            raise ArtifactError(f"multi-rate artifacts run on onnxruntime only for now, not {backend!r}; "
                                "use the onnxruntime backend (--backend onnxruntime, backend='onnxruntime' in "
                                "Python).")
        self._open(path, profile, streams)
        # each stage runs at most this many rows at once: ONNX Runtime's activations stay those of a
        # max_batch-row batch however many cameras the session holds
        self.max_batch = chunk_rows(max_batch, self.streams)
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
        self._io: list[tuple[list[str], list[tuple[str, str, str]]]] = []
        self._types: dict[str, np.dtype] = {}  # every stage's graph inputs: states, buffers, the frame
        hashes = self.precision.get("sha256") or [None] * len(self.precision["files"])
        for st, file, sha in zip(self._stages, self.precision["files"], hashes, strict=True):
            # each stage's thread pool stops spinning when its run returns: left spinning (ONNX Runtime's
            # default) it competed with the next stage's run, and full-size r3d18-causal took 18.6–20.0
            # ms/frame against 8.5–8.9 (host B, 2 cores)
            sess = _load_session(folder / file, threads, spin, stop_spinning=True)
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
            # each stage's buffer inputs and (state, input, output) names, looked up once, not per frame
            self._io.append(([i["name"] for i in st["inputs"]], [(n, *state_io_names(n)) for n in st["states"]]))
        self._stage_ms: list[deque[float]] = [deque(maxlen=10000) for _ in self._stages]
        self._bins: deque[np.ndarray] = deque(maxlen=10000)
        # ms of each whole cycle of the stages (output_period frames from one output of the slowest stage
        # to the next): per-frame percentiles of a multi-rate model time stage 0 alone on most frames
        self.cycle_ms: deque[float] = deque(maxlen=10000)
        self.last_fresh = False
        self.fresh = np.zeros(0, bool)
        self.last_extras: dict[str, np.ndarray] = {}
        # (stage, feeds) of the stages the last step ran, for INT8 calibration (exporters/calibration.py);
        # they may share memory with the session's states, so they are read before the next call
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
        self._t = np.zeros(k, np.int64)  # frames each stream has stepped since its start
        self._cycle = [0.0, 0]  # ms and frames stepped since the slowest stage last ran
        self._last = np.zeros((k, *[int(d) for d in self.manifest["output"]["shape"][1:]]), np.float32)
        self.last_fresh = False
        self.fresh = np.zeros(0, bool)

    @property
    def has_outputs(self) -> np.ndarray:
        """Per stream: whether its slowest stage has run since its start (or its restored snapshot's
        start); before that, ``step`` returns zeros for it, which are no prediction."""
        return self._t >= output_period(self.manifest)

    @property
    def has_output(self) -> bool:
        """Whether every stream has an output (see :attr:`has_outputs`)."""
        return bool(self.has_outputs.all())

    def frame_ms(self) -> np.ndarray:
        """Each whole cycle's ms over its frames: stage k runs on every P_k-th frame, so half the frames
        of a stride-8 model run stage 0 alone, and a median over single frames timed little more than
        that (9.1 ms/frame for a full-size r3d18-causal that took 11.0 over whole cycles)."""
        return np.asarray(self.cycle_ms) / output_period(self.manifest)

    def latency(self) -> dict[str, Any]:
        """Over whole cycles of the stages (:meth:`frame_ms`) once one has run, else over the calls."""
        a = self.frame_ms()
        if not len(a):
            return super().latency()
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "cycles": True}

    def top_k(self, output: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
        """As :meth:`Session.top_k`, refused before the first output: the zeros ``step`` returns then
        would name the first class at a uniform score, a prediction the model never made."""
        if not self.has_outputs.any():  # with several streams the row's stream is not known here
            rate = output_period(self.manifest)
            raise ValueError(f"this multi-rate session has no prediction yet: its slowest stage first runs on "
                             f"frame {rate} of each clip, counting from 1, and until then step returns zeros; call "
                             "top() once has_output is True.")
        return super().top_k(output, k)

    @serialised
    def reset(self, stream: int | None = None) -> None:
        """Back to the initial state: one stream (its states, buffers and frame count), or all."""
        if stream is None:
            self._init_all()
            return
        self._check_stream(stream)
        k = int(stream)
        dtypes = self.state_dtypes()
        for n, s in self._specs.items():
            self._states[n][k] = initial_value(s, self.precision, dtypes[n])
        for a in self._buf.values():
            a[k] = 0
        self._t[k] = 0
        self._last[k] = 0
        self._cycle = [0.0, 0]  # a cycle cut by the reset is not counted

    def _snapshot(self) -> dict[str, np.ndarray]:
        """Copies of every stream's states, stage buffers, frame count and newest output (get_state's)."""
        snap = {n: a.copy() for n, a in self._states.items()}
        snap.update({n: a.copy() for n, a in self._buf.items()})
        snap["frame_index"] = self._t.copy()
        snap["last_output"] = self._last.copy()
        return snap

    @serialised
    def set_state(self, snapshot: dict[str, np.ndarray], stream: int | None = None) -> None:
        """Restore :meth:`get_state`'s snapshot of every stream, or with ``stream`` a one-stream
        snapshot into that stream; the other streams are left alone."""
        require_mapping(snapshot)
        if stream is not None:
            self._check_stream(stream)
        current = self._snapshot()
        require_only_states(snapshot, current)
        rows = slice(None) if stream is None else slice(int(stream), int(stream) + 1)
        source = ("a dict from get_state() of a session with the same artifact, profile and streams" if stream is None
                  else "a one-stream snapshot, get_state(stream=k), of a session with the same artifact and profile")
        for n, a in current.items():
            want = a[rows]
            got = np.asarray(snapshot[n]) if n in snapshot else None
            if got is None or got.shape != want.shape or (got.dtype != a.dtype and n != "frame_index"):
                raise ValueError(f"snapshot lacks state {n!r} or has the wrong shape or dtype ({a.dtype}"
                                 f"{list(want.shape)} here); pass {source}.")
        t = np.asarray(snapshot["frame_index"])
        if t.dtype.kind not in "iu" or (t < 0).any():
            raise ValueError(f"snapshot frame_index {t.tolist()} must be frame counts (integers >= 0); pass {source}.")
        for held in (self._states, self._buf):
            for n in held:
                held[n][rows] = snapshot[n]
        self._t[rows] = t
        self._cycle = [0.0, 0]  # a cycle cut by the restore is not counted
        self._last[rows] = snapshot["last_output"]

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
        return self.step_batch([frame], [stream])[0]

    @serialised
    def step_fresh(self, frame: np.ndarray, stream: int = 0) -> tuple[np.ndarray, bool]:
        out = self.step(frame, stream)
        return out, self.last_fresh

    @serialised
    def step_batch(self, frames: Any, stream_ids: Any = None) -> np.ndarray:
        """One frame for each stream in ``stream_ids`` (default: all, in order), as one call; any
        subset, in any order. Returns each stream's newest output in the order of ``stream_ids``;
        ``fresh`` says, per row, whether this frame produced it."""
        ids = self._check_ids(stream_ids)
        check_frame_count(frames, len(ids))
        f = self.manifest["frame"]
        staged = np.empty((len(ids), f["channels"], f["height"], f["width"]), np.float32)
        self._preprocess(frames, ids, staged)  # every frame validated before any state changes
        every = stream_ids is None or (len(ids) == self.streams and bool((ids == np.arange(self.streams)).all()))
        # every stream, all at one frame count: the usual call, each stage one batch of every row
        in_phase = every and bool((self._t == self._t[0]).all())
        t0 = time.perf_counter()
        self._advance(staged.astype(self._types["frame"], copy=False), ids, every, in_phase)  # float16 io too
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.record(ms, len(ids))
        if not in_phase:  # ms/frame over whole cycles is defined while every stream steps in one phase
            self._cycle = [0.0, 0]
        else:
            self._cycle = [self._cycle[0] + ms, self._cycle[1] + 1]
            if self.last_fresh:
                if self._cycle[1] == output_period(self.manifest):
                    self.cycle_ms.append(self._cycle[0])
                self._cycle = [0.0, 0]
        return self._last.copy() if every else self._last[ids]

    def _feeds(self, k: int, frame: np.ndarray, bufs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage k's graph inputs: the frame (stage 0) or its buffers, and its states."""
        buffers_in, states_io = self._io[k]
        feeds = {"frame": frame} if k == 0 else {b: bufs[b] for b in buffers_in}
        feeds.update({i: self._states[n] for n, i, _ in states_io})
        return feeds

    def _advance(self, frame: np.ndarray, ids: np.ndarray, every: bool, in_phase: bool) -> None:
        """Run each stage on the rows of the call whose frame count reaches its rate, then commit.

        Rows are the call's (``frame[i]`` is stream ``ids[i]``'s). ``in_phase`` (every stream, all at
        one frame count) feeds each stage's states and buffers as they are; otherwise the rows that
        run a stage are gathered. New states and buffers are committed once every stage has run, so
        a failing graph changes nothing.
        """
        t = self._t[ids]
        t0_ = int(t[0])
        new_states: dict[str, np.ndarray] = {}
        new_rows: dict[str, np.ndarray] = {}  # the streams of a state that ran on some rows only
        bufs = dict(self._buf)
        fresh = False if in_phase else np.zeros(len(ids), bool)
        last: tuple[np.ndarray | None, np.ndarray] | None = None
        extras: dict[str, np.ndarray] = {}
        timings: list[tuple[int, float]] = []
        ran: list[tuple[int, dict[str, np.ndarray]]] = []
        rows = None if in_phase else np.arange(len(ids))  # the call's rows that ran the stage before
        for k, st in enumerate(self._stages):
            rate = st["rate"]
            if rows is None:
                if (t0_ + 1) % rate:
                    break
                streams = slots = None
            else:
                rows = rows[(t[rows] + 1) % rate == 0]
                if not len(rows):
                    break
                streams = None if every and len(rows) == self.streams else ids[rows]
                slots = (t[rows] + 1) // rate - 1  # each row's run of this stage, counting from 0
            gather = _all_rows if streams is None else _rows_of(streams)
            sess, out_names = self._sess[k]
            buffers_in, states_io = self._io[k]
            feeds = ({"frame": frame if rows is None or len(rows) == len(ids) else frame[rows]} if k == 0 else
                     {b: gather(bufs[b]) for b in buffers_in})
            feeds.update({i: gather(self._states[n]) for n, i, _ in states_io})
            t0 = time.perf_counter()
            res = self._run(sess, out_names, feeds)
            timings.append((k, (time.perf_counter() - t0) * 1e3))
            if self.keep_feeds:  # gathered copies, or arrays the commit replaces (reset/set_state write in place)
                ran.append((k, feeds))
            for n, _, o in states_io:  # each state is one stage's: read above, written at the commit
                new_states[n] = res[o]
                if streams is not None:
                    new_rows[n] = streams
            if k + 1 < len(self._stages):
                stride = self._stages[k + 1]["stride"]
                for o in st["outputs"]:
                    name = buffer_of_feed(o["name"])
                    y = res[o["name"]]
                    c = y.shape[1]
                    buf = bufs[name].copy()  # commit only after every stage ran
                    if slots is None:
                        slot = ((t0_ + 1) // rate - 1) % stride
                        buf[:, slot * c:(slot + 1) * c] = y
                    else:
                        at_rows = ids[rows]  # type: ignore[index]
                        for slot in np.unique(slots % stride).tolist():
                            at = slots % stride == slot
                            buf[at_rows[at], slot * c:(slot + 1) * c] = y[at]
                    bufs[name] = buf
            else:
                if rows is None:
                    fresh = True
                else:
                    fresh[rows] = True  # type: ignore[index]
                last = (streams, res["output"])
                extras = {o["name"]: res[o["name"]] for o in st["outputs"][1:]}
        # commit: a state that ran on every row takes the graph's output array; one that ran on some
        # rows gets them written in place (not a copy of every stream's state per call)
        for n, y in new_states.items():
            if n in new_rows:
                self._states[n][new_rows[n]] = y
            else:
                self._states[n] = y
        self._buf.update(bufs)
        for k, ms in timings:
            self._stage_ms[k].append(ms)
        if last is not None:
            if last[0] is None:
                self._last[...] = last[1]
            else:
                self._last[last[0]] = last[1]
            self.last_extras = extras
            if "bins_used" in extras:
                self._bins.append(np.asarray(extras["bins_used"]).reshape(-1))
        self.fresh = np.full(len(ids), fresh) if in_phase else fresh
        self.last_fresh = bool(fresh) if in_phase else bool(fresh.all())  # type: ignore[union-attr]
        self.last_feeds = ran
        if in_phase:
            self._t += 1
        else:
            self._t[ids] = t + 1

    def _run(self, sess: Any, out_names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One stage graph on its rows, in runs of at most ``max_batch`` rows (every input and output
        is batch-major), joined back in order."""
        rows = len(next(iter(feeds.values())))
        b = self.max_batch
        if b is None or rows <= b:
            return dict(zip(out_names, sess.run(None, feeds), strict=True))
        parts = [sess.run(None, {k: v[a:a + b] for k, v in feeds.items()}) for a in range(0, rows, b)]
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(out_names)}

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
