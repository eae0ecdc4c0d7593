"""ONNX Runtime backend: preallocated state buffers ping-ponged through I/O bindings.

Two bindings are made once, one per parity: parity p reads states from buffer p and writes
them to buffer 1-p, so a step allocates no state tensor and never binds one buffer as both
input and output. Stepping a subset of streams gathers their rows into staging buffers and
scatters the new rows back only after the run succeeded, so a failed run changes no state.

With ``max_batch`` B smaller than the stream count (a server with many cameras), the
ping-pong pair would double every stream's state and ONNX Runtime's activations would grow
with N. Instead the streams' states live in one set, and every call runs in chunks of at
most B rows through the fixed staging pair (gather, run, scatter): memory per extra stream is
its state plus a frame and an output row, and activations stay those of a B-row batch.
The price is two row copies per stream and step (a few percent of a step, see
``edge3d bench-streams``). A chunk that fails leaves its own streams unchanged, but chunks
that ran before it keep their new state.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import (
    METADATA_KEY,
    ArtifactError,
    check_file_hash,
    io_names,
    is_positive_int,
    precision_entry,
    state_io_names,
    validate_manifest,
)
from .base import Backend

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def chunk_rows(max_batch: int | None, streams: int) -> int | None:
    """The rows per run that ``max_batch`` asks for, or None where one run of every stream will do:
    chunking only pays when it caps something."""
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"--max-batch (max_batch in Python) must be a positive integer, got {max_batch!r}; "
                         "leave it out to run all streams in one call.")
    return max_batch if max_batch is not None and max_batch < streams else None


def _load_session(path: Path, threads: int | None, spin: bool = True, stop_spinning: bool = False):
    """``spin=False`` lets the pool threads sleep as soon as a run ends. ONNX Runtime's default keeps them
    spinning for a while (25 ms after each run on host C), which is faster for one session stepped
    back to back, but N one-stream sessions stepped in turn in one process spin against each other:
    four full-size d-resnet18 sessions ran 67 frames/s spinning and 118 without (host C).

    ``stop_spinning`` keeps the spinning within a run (between its parallel sections) and stops it when
    the run returns (``session.force_spinning_stop``): for graphs that always run one after another, as
    a multi-rate model's stages do, each of which would otherwise spin against the next."""
    import onnxruntime as ort

    if os.environ.get("ORT_DISABLE_TELEMETRY", "").strip().lower() in ("1", "true", "yes"):
        # importing edge3d sets it; an app that imported onnxruntime first started telemetry with that
        # import, and this stops the events recorded for each session created
        ort.disable_telemetry_events()
    if threads is not None and not is_positive_int(threads):
        raise ValueError(f"--threads (threads in Python) must be a positive integer, got {threads!r}; leave it out "
                         "for ONNX Runtime's default of one per core.")
    if not isinstance(spin, bool):
        raise ValueError(f"spin must be True or False, got {spin!r}.")
    if not path.is_file():
        raise ArtifactError(f"the artifact lacks {path.name} ({path}); re-export it with `edge3d export`.")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    # fatal only: a failed run (its arena out of memory, say) is raised with the same message, which the
    # caller turns into one sentence; ORT's own log line would come first, in red
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for corrupt files
        reason = ort_reason(e)
        if re.search(r"(IR version|opset|Opset).*(support|under development)", reason):
            raise ArtifactError(
                f"onnxruntime {ort.__version__} is too old for {path.name} ({reason}); upgrade it "
                "(pip install --upgrade onnxruntime) on this machine."
            ) from e
        raise ArtifactError(
            f"ONNX Runtime {ort.__version__} cannot load {path.name} ({reason}); the file is corrupt or truncated, "
            "re-export it."
        ) from e


def ort_reason(e: BaseException) -> str:
    """ONNX Runtime's own words from one of its exceptions, without the C++ location in front.

    Its messages read "[ONNXRuntimeError] : 1 : FAIL : Load model from X failed:/onnxruntime_src/...
    model.cc:179 onnxruntime::Model::Model(onnx::ModelProto&&, ...) Unsupported model IR version: 10, max
    supported IR version: 9": cut at a fixed length, the reason itself was lost behind the signature.
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"onnxruntime::[\w:~]+\([^()]*\)\s*(.+)$", text)
    return (m.group(1) if m else text)[:200]


def embedded_manifest(path: Path) -> dict[str, Any]:
    """The manifest an edge3d ONNX file carries in its metadata, for a .onnx copied out of its
    artifact folder (`edge3d inspect model.fp16.onnx`): the file still says what its states are."""
    sess = _load_session(Path(path), None)
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ArtifactError(f"{path} has no manifest.json beside it and no edge3d manifest in its metadata; "
                            "pass an artifact folder written by `edge3d export`, or an ONNX file from one.")
    manifest = json.loads(meta[METADATA_KEY])
    # Each file embeds the artifact's manifest without the other files' entries: its own precision's
    # entry under "precision", or none at all in the FP32 file, whose states are its dtypes.
    entry = manifest.pop("precision", None) or {
        "file": Path(path).name if "stage" in manifest else "model.fp32.onnx", "profile": "fp32",
        "state_dtypes": {s.get("name"): s.get("dtype") for s in manifest.get("states", [])}}
    manifest.setdefault("precisions", {entry.get("profile", "?"): entry})
    validate_manifest(manifest, f"the manifest in {Path(path).name}")
    return manifest


def check_graph_against_manifest(sess: Any, manifest: dict[str, Any], path: Path) -> None:
    """Fail at load if the graph and the manifest disagree on names, shapes or source model."""
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY in meta:
        inner = json.loads(meta[METADATA_KEY])
        if inner.get("model", {}).get("source_hash") != manifest.get("model", {}).get("source_hash"):
            raise ArtifactError(
                f"manifest.json describes a different model than {path.name} "
                f"({manifest.get('model', {}).get('name')} vs {inner.get('model', {}).get('name')}, source hashes "
                "differ); re-export the artifact instead of mixing files."
            )
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    expected_in, expected_out = io_names(manifest)
    if set(inputs) != expected_in or set(outputs) != expected_out:
        missing = sorted((expected_in - set(inputs)) | (expected_out - set(outputs)))
        extra = sorted((set(inputs) - expected_in) | (set(outputs) - expected_out))
        raise ArtifactError(
            f"{path.name} does not match manifest.json (missing {missing[:3]}, unexpected {extra[:3]}); "
            "re-export the artifact instead of mixing files."
        )
    for s in manifest["states"]:
        got = inputs[state_io_names(s["name"])[0]].shape[1:]
        if [int(d) for d in s["shape"][1:]] != [d if isinstance(d, int) else -1 for d in got]:
            raise ArtifactError(
                f"{path.name}: state {s['name']} has shape {got} in the graph but {s['shape'][1:]} in "
                "manifest.json; re-export the artifact."
            )
    f = manifest["frame"]
    got = inputs["frame"].shape[1:]
    if list(got) != [f["channels"], f["height"], f["width"]]:
        raise ArtifactError(f"{path.name}: frame input {got} disagrees with manifest.json; re-export.")


def check_state_dtypes(dtypes: dict[str, np.dtype], entry: dict[str, Any], path: Path) -> None:
    """Fail at load if the graph's state dtypes disagree with the precision's manifest entry."""
    for name, want in (entry.get("state_dtypes") or {}).items():
        if name in dtypes and np.dtype(want) != dtypes[name]:
            raise ArtifactError(
                f"{path.name}: state {name} is {dtypes[name]} in the graph but {want} in manifest.json; "
                "re-export the artifact instead of mixing files."
            )


def initial_value(spec: dict[str, Any], entry: dict[str, Any], dtype: np.dtype) -> Any:
    """The initial value of a state in its stored dtype; quantised states store round(init/scale)+zp."""
    init = float(spec.get("init", 0.0))
    quant = (entry.get("state_quant") or {}).get(spec["name"])
    if quant is None:
        return init
    info = np.iinfo(dtype)
    q = round(init / float(quant["scale"])) + int(quant.get("zero_point", 0))
    return int(min(max(q, info.min), info.max))


def _bind(sess: Any, frame: np.ndarray, output: np.ndarray, src: dict[str, np.ndarray],
          dst: dict[str, np.ndarray]) -> Any:
    """One I/O binding over preallocated host buffers (C-contiguous, possibly leading-row views)."""
    b = sess.io_binding()
    b.bind_input("frame", "cpu", 0, frame.dtype, frame.shape, frame.ctypes.data)
    b.bind_output("output", "cpu", 0, output.dtype, output.shape, output.ctypes.data)
    for name in src:
        i, o = state_io_names(name)
        b.bind_input(i, "cpu", 0, src[name].dtype, src[name].shape, src[name].ctypes.data)
        b.bind_output(o, "cpu", 0, dst[name].dtype, dst[name].shape, dst[name].ctypes.data)
    return b


class _Plan:
    """The full call's buffers: frames, outputs, two state sets, and one binding per parity."""

    def __init__(self, sess: Any, frame: np.ndarray, output: np.ndarray,
                 states: list[dict[str, np.ndarray]]) -> None:
        self.frame, self.output = frame, output
        self.states = states  # states[p][name]: the set read at parity p
        # Chunked sessions keep one state set and no full-call binding (see the module docstring).
        self.bindings = [_bind(sess, frame, output, states[p], states[1 - p]) for p in (0, 1)] \
            if len(states) == 2 else []


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest: dict[str, Any], profile: str, streams: int, threads: int | None = None,
                 max_batch: int | None = None, spin: bool = True) -> None:
        super().__init__(manifest, profile, streams)
        self.max_batch = chunk_rows(max_batch, streams)
        entry = precision_entry(manifest, profile)
        self.path = Path(manifest["_folder"]) / entry["file"]
        self.sess = _load_session(self.path, threads, spin)
        check_graph_against_manifest(self.sess, manifest, self.path)
        types = {i.name: _ORT_TYPES[i.type] for i in self.sess.get_inputs()}
        out_types = {o.name: _ORT_TYPES[o.type] for o in self.sess.get_outputs()}
        self.state_names = [s["name"] for s in manifest["states"]]
        self._specs = {s["name"]: s for s in manifest["states"]}
        self._dtypes = {n: np.dtype(types[state_io_names(n)[0]]) for n in self.state_names}
        check_state_dtypes(self._dtypes, entry, self.path)
        check_file_hash(self.path, entry.get("sha256"))  # last: the checks above name a mix-up of files better
        self._init = {n: initial_value(self._specs[n], entry, self._dtypes[n]) for n in self.state_names}
        f = manifest["frame"]
        self.frame_shape = (f["channels"], f["height"], f["width"])
        self.frame_dtype = np.dtype(types["frame"])
        self.output_shape = tuple(int(d) for d in manifest["output"]["shape"][1:])
        self.output_dtype = np.dtype(out_types["output"])
        # The full call's frame and output buffers serve subset calls too (their k leading
        # rows): each call writes its frame rows before running and copies its output rows after.
        self._full = _Plan(self.sess, np.zeros((streams, *self.frame_shape), self.frame_dtype),
                           np.zeros((streams, *self.output_shape), self.output_dtype),
                           [self._initial_set(streams) for _ in range(1 if self.max_batch else 2)])
        self._parity = 0
        # Subset calls gather rows into one staging pair, made on first use and sized for the
        # largest subset so far; each subset size k binds its k leading rows, so memory stays
        # 2 x (largest subset) rows however many different subset sizes a caller uses.
        self._staging: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self._staging_rows = 0  # counted, not read off a buffer: a model may have no state at all
        self._subsets: dict[tuple[int, int], Any] = {}

    def _initial_set(self, k: int) -> dict[str, np.ndarray]:
        out = {}
        for name in self.state_names:
            s = self._specs[name]
            out[name] = np.full((k, *[int(d) for d in s["shape"][1:]]), self._init[name], self._dtypes[name])
        return out

    @property
    def frame_buffer(self) -> np.ndarray:
        """Staging buffer for all streams' frames; the Session preprocesses straight into it."""
        return self._full.frame

    def subset_frame_buffer(self, k: int) -> np.ndarray:
        return self._full.frame[:k]

    def state_dtypes(self) -> dict[str, np.dtype]:
        return dict(self._dtypes)

    @property
    def _current(self) -> dict[str, np.ndarray]:
        return self._full.states[self._parity]

    def step_all(self, frames: np.ndarray) -> np.ndarray:
        if self.max_batch:
            return self.step_rows(frames, np.arange(self.streams))
        if frames.ctypes.data != self._full.frame.ctypes.data:
            self._full.frame[...] = frames
        self.sess.run_with_iobinding(self._full.bindings[self._parity])
        self._parity ^= 1
        return self._full.output.copy()

    def _staging_for(self, k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The staging pair, grown (never shrunk) to at least k rows."""
        if self._staging is None or self._staging_rows < k:
            # Grow-only: sized for the largest subset seen, so a caller that steps a few
            # streams at a time never pays for staging rows of all of them.
            self._staging = (self._initial_set(k), self._initial_set(k))
            self._staging_rows = k
            self._subsets.clear()
        return self._staging

    def _subset_binding(self, k: int, offset: int = 0) -> Any:
        """The binding of a k-row call whose frames and outputs sit at rows offset.. of the full buffers."""
        src, dst = self._staging_for(k)
        key = (k, offset)
        if key not in self._subsets:
            rows = slice(offset, offset + k)
            self._subsets[key] = _bind(self.sess, self._full.frame[rows], self._full.output[rows],
                                       {n: a[:k] for n, a in src.items()}, {n: a[:k] for n, a in dst.items()})
        return self._subsets[key]

    def gather(self, rows: np.ndarray) -> None:
        """Copy the current state rows of ``rows`` into the leading rows of the staging inputs."""
        src, _ = self._staging_for(len(rows))
        cur = self._current
        for n in self.state_names:
            np.take(cur[n], rows, axis=0, out=src[n][: len(rows)])

    def scatter(self, rows: np.ndarray) -> None:
        """Copy the new state rows from the staging outputs back to the streams in ``rows``."""
        _, dst = self._staging_for(len(rows))
        cur = self._current
        for n in self.state_names:
            cur[n][rows] = dst[n][: len(rows)]

    def step_rows(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        k = len(rows)
        if frames.ctypes.data != self._full.frame.ctypes.data:  # not already staged by the Session
            self._full.frame[:k] = frames
        chunk = self.max_batch or k
        for a in range(0, k, chunk):
            part = rows[a:a + chunk]
            binding = self._subset_binding(len(part), a)
            self.gather(part)
            self.sess.run_with_iobinding(binding)  # if this raises, this chunk's states are unchanged
            self.scatter(part)
        return self._full.output[:k].copy()

    def reset_rows(self, rows: np.ndarray) -> None:
        cur = self._current
        for n in self.state_names:
            cur[n][rows] = self._init[n]

    def read_states(self) -> dict[str, np.ndarray]:
        return {n: b.copy() for n, b in self._current.items()}

    def write_states(self, states: dict[str, np.ndarray]) -> None:
        cur = self._current
        for n in self.state_names:
            cur[n][...] = states[n]

    def run_bare(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A plain ``InferenceSession.run`` on the same graph, for overhead benchmarks."""
        return self.sess.run(None, feeds)

    def close(self) -> None:
        """Drop the graph, its bindings and every state buffer, so that a server closing a camera's
        session gets the memory back at once (the Session refuses later calls)."""
        self.sess = None
        self._full = None
        self._staging, self._subsets = None, {}
