"""Many streams in one process: what batching N streams into one Session buys and costs.

An operator serving N cameras from one box can run one ``Session(streams=N)`` and step all
cameras in one call, or run N ``Session``s one after another. ``measure_streams`` measures,
for each N, on the same frames:

- **throughput**: aggregate frames/s and ms per call, batched vs separate sessions;
- **gather/scatter**: a call that steps a subset of streams copies their state rows into
  staging buffers and back; its cost is timed alone and as a share of a full call of the
  same batch size (a shuffled call of all N streams against the in-order full call);
- **memory**: resident memory (RSS) added per extra batched stream vs per extra separate
  session, against that stream's state bytes.

RSS is measured in fresh child processes, one per (mode, N, repeat): each imports the
runtime, creates the session(s), steps a few full calls so ONNX Runtime's arena reaches its
steady size, returns freed heap pages to the OS (``malloc_trim``) and reads
``/proc/self/statm``. A fresh process per point keeps allocator history (arena growth from
earlier sizes) out of the differences, the trim keeps memory freed by session creation from
hiding later allocations, and the median over repeats keeps neighbours on a shared machine
out of it. Timings are medians of per-call times for the same reason.

Only numpy and the runtime are used (no torch), so this runs wherever the runtime does.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DISTINCT_FRAMES = 8  # distinct frames per stream, cycled: enough to keep caches honest, little memory
WARMUP_CALLS = 3
PAUSE_S = 0.01  # before each timed call at least, then until the process is idle (see settle)
SETTLE_WINDOW_S = 0.005
SETTLE_MAX_S = 1.0


def settle(min_s: float) -> None:
    """Sleep ``min_s``, then until this process's threads have gone idle (under a tenth of a core over
    5 ms), for at most a second.

    ONNX Runtime's pool threads spin after a run before they sleep. The benchmark paused a fixed
    10 ms, but on a 2-core Xeon (host C, onnxruntime 1.32) one session's threads spun for 25 ms and
    four sessions' for 70 ms: the next timed call shared the cores with them, and bench-streams put
    a full-size d-resnet18 at 68 frames/s where it runs 117.
    """
    time.sleep(min_s)
    end = time.perf_counter() + SETTLE_MAX_S
    while time.perf_counter() < end:
        c0 = time.process_time()
        time.sleep(SETTLE_WINDOW_S)
        if time.process_time() - c0 < 0.1 * SETTLE_WINDOW_S:
            return


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS counts live memory only.

    Creating an ONNX Runtime session frees about as much memory as it keeps (the parsed model,
    unoptimised initialisers). glibc keeps those pages resident and later numpy buffers reuse
    them, so without a trim the state buffers of up to ~8 full-size streams hide inside memory
    the process already had and RSS does not grow at all.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also counts freed heap
        pass


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; ru_maxrss elsewhere, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _frame_shape(manifest: dict[str, Any]) -> tuple[int, int, int]:
    f = manifest["frame"]
    return int(f["channels"]), int(f["height"]), int(f["width"])


def _frames(frame_shape: tuple[int, ...], streams: int, seed: int = 0) -> np.ndarray:
    """Normalised float32 frames (DISTINCT_FRAMES, streams, C, H, W), the same for every mode."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((DISTINCT_FRAMES, streams, *frame_shape), dtype=np.float32)


# Where Linux on ARM boards (a Jetson among them) names the board; x86 machines have no such file.
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def board_model() -> str | None:
    """The board's name from the device tree, e.g. "NVIDIA Jetson Orin Nano Developer Kit".

    ARM CPUs list no "model name" in /proc/cpuinfo, so without it a Jetson's bench report named
    its host "aarch64", which says nothing about which module (and which clocks) gave the figures.
    """
    try:
        text = DEVICE_TREE_MODEL.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    return text.strip("\x00 \n") or None


def vector_isa(flags: set[str]) -> str | None:
    """The widest SIMD the CPU reports, and AMX where it has it: two hosts of the same core count ran
    the same step at 0.64 and 0.85 of their MatMul yardstick, and the ISA is the first thing to
    compare ("avx512, amx" against "avx2")."""
    wide = next((name for flag, name in (("avx512f", "avx512"), ("avx2", "avx2"), ("sve", "sve"),
                                         ("asimd", "neon"), ("neon", "neon"), ("sse4_2", "sse4.2"))
                 if flag in flags), None)
    return ", ".join(n for n in (wide, "amx" if "amx_tile" in flags else None) if n) or None


def host_line(h: dict[str, Any]) -> str:
    """The host of a report in one line: board, CPU, family/model, SIMD, logical CPUs, library versions."""
    family = f", family/model {h['cpu_family_model']}" if h.get("cpu_family_model") else ""
    family += f", {h['cpu_vector_isa']}" if h.get("cpu_vector_isa") else ""
    board = f"{h['board']}, " if h.get("board") else ""
    return (f"{board}{h['cpu']}{family} ({h['logical_cpus']} logical CPUs), onnxruntime {h['onnxruntime']}"
            + (f", torch {h['torch']}" if h.get("torch") else ""))


def host_info() -> dict[str, Any]:
    """The machine and library versions a report was measured with.

    The ratios depend on the host: the step is bound by FMA throughput and memory bandwidth,
    PyTorch's eager loop mostly by per-op overhead, so the same code gave 3.1-3.5x over eager on
    one 2-core host and 1.9-2.3x on another. A figure is only comparable to one from the same host.
    """
    import platform

    import onnxruntime as ort

    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "cpu MHz", "flags", "Features") and key not in cpu:
                cpu[key] = value.strip()
    except OSError:  # not Linux
        pass
    info: dict[str, Any] = {
        "board": board_model(),
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{cpu['cpu family']}/{cpu['model']}" if "cpu family" in cpu and "model" in cpu else None,
        "cpu_mhz": float(cpu["cpu MHz"]) if "cpu MHz" in cpu else None,
        "cpu_vector_isa": vector_isa(set((cpu.get("flags") or cpu.get("Features") or "").split())),
        "logical_cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "numpy": np.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    try:
        info["torch"] = version("torch")
    except PackageNotFoundError:  # torch is optional: a runtime-only install benches artifacts without it
        info["torch"] = None
    return info


def interleaved_times(fns: dict[str, Any], calls: int, pause_s: float = 0.0
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall ms and process-CPU ms of every call, calling the functions in turn ``calls`` times.

    Interleaving call by call makes a slow spell on a shared machine hit every mode alike. CPU
    time (all threads of this process) still counts only the work done when other jobs hold
    the cores, which wall time does not. ``pause_s`` > 0 waits before each timed call at least that
    long and until ONNX Runtime's pool threads, which spin for a while after a run, have gone idle
    (:func:`settle`), so the next call does not pay for the previous one's spin. Each function is
    called with the call's index.
    """
    wall: dict[str, list[float]] = {m: [] for m in fns}
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    for i in range(calls):
        for mode, fn in fns.items():
            if pause_s:
                settle(pause_s)
            c0, t0 = time.process_time(), time.perf_counter()
            fn(i)
            wall[mode].append((time.perf_counter() - t0) * 1e3)
            cpu[mode].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def _interleave(fns: dict[str, Any], calls: int, pause_s: float = 0.0) -> dict[str, tuple[float, float]]:
    """Median wall ms and median process-CPU ms per function (see ``interleaved_times``)."""
    wall, cpu = interleaved_times(fns, calls, pause_s)
    return {m: (statistics.median(wall[m]), statistics.median(cpu[m])) for m in fns}


def _time_point(artifact: Path, n: int, frames: int, profile: str, threads: int | None,
                max_batch: int | None = None, spin: bool = True) -> dict[str, float]:
    """Throughput and gather/scatter cost for N streams, in this process.

    A multi-rate artifact is timed in whole cycles of its stages (each timed call steps P frames of
    every stream), so it has no subset or gather/scatter figures (None): a single-frame subset call
    costs whatever stages that frame runs, and its scheduler gathers rows per stage, not through the
    single-graph backend timed here."""
    from .runtime import Session
    from .runtime.manifest import output_period

    batched = Session(artifact, profile=profile, backend="onnxruntime", streams=n, threads=threads,
                      max_batch=max_batch, spin=spin)
    separate = [Session(artifact, profile=profile, backend="onnxruntime", threads=threads, spin=spin)
                for _ in range(n)]
    period = output_period(batched.manifest)
    data = _frames(_frame_shape(batched.manifest), n)
    perm = np.roll(np.arange(n), 1) if n > 1 else np.arange(1)  # every stream, not in order

    def batched_call(i: int) -> None:
        for k in range(i * period, (i + 1) * period):
            batched.step_batch(data[k % DISTINCT_FRAMES])

    def separate_round(i: int) -> None:
        for k in range(i * period, (i + 1) * period):
            f = data[k % DISTINCT_FRAMES]
            for s, sess in enumerate(separate):
                sess.step(f[s])

    def subset_call(i: int) -> None:
        batched.step_batch(data[i % DISTINCT_FRAMES][perm], perm)

    multi_rate = "stages" in batched.manifest  # timed in whole cycles: no single-frame subset, no gather/scatter
    backend = None if multi_rate else batched._backend
    chunk = (backend.max_batch if backend else None) or n

    def gather_scatter(_: int) -> None:
        for a in range(0, n, chunk):  # as a call moves them: at most one chunk of rows at a time
            backend.gather(perm[a:a + chunk])
            backend.scatter(perm[a:a + chunk])

    warm = (batched_call, separate_round) if multi_rate else (batched_call, separate_round, subset_call, gather_scatter)
    for i in range(WARMUP_CALLS):
        for fn in warm:
            fn(i)
    vs_separate = _interleave({"batched": batched_call, "separate": separate_round}, frames, PAUSE_S)
    (batched_ms, batched_cpu), (separate_ms, separate_cpu) = vs_separate["batched"], vs_separate["separate"]
    subset: dict[str, float | None] = dict.fromkeys(
        ("full_call_ms", "subset_call_ms", "subset_over_full", "gather_scatter_ms", "gather_scatter_share",
         "gather_scatter_cpu_ms", "gather_scatter_share_cpu"))
    if not multi_rate:
        # Subset vs full on the batched session alone, so no other session's threads are around.
        vs_subset = _interleave({"full": batched_call, "subset": subset_call}, frames, PAUSE_S)
        gs_ms, gs_cpu = _interleave({"gather_scatter": gather_scatter}, max(20, frames))["gather_scatter"]
        (full_ms, full_cpu), (subset_ms, _) = vs_subset["full"], vs_subset["subset"]
        subset = {"full_call_ms": full_ms, "subset_call_ms": subset_ms, "subset_over_full": subset_ms / full_ms,
                  "gather_scatter_ms": gs_ms, "gather_scatter_share": gs_ms / full_ms, "gather_scatter_cpu_ms": gs_cpu,
                  "gather_scatter_share_cpu": gs_cpu / full_cpu}
    for sess in [batched, *separate]:
        sess.close()
    # a call steps `period` frames of each of N streams (batched) or of N sessions (a round)
    return {
        "frames_per_call": period,
        "batched_ms_per_call": batched_ms,
        "separate_ms_per_round": separate_ms,
        "separate_ms_per_call": separate_ms / n,
        "batched_fps": 1e3 * n * period / batched_ms,
        "separate_fps": 1e3 * n * period / separate_ms,
        "batched_over_separate": separate_ms / batched_ms,
        "batched_cpu_ms_per_call": batched_cpu,
        "separate_cpu_ms_per_round": separate_cpu,
        "batched_over_separate_cpu": separate_cpu / batched_cpu,
        **subset,
    }


def rss_child(artifact: str, mode: str, n: int, profile: str, threads: int | None,
              max_batch: int | None = None) -> dict[str, int]:
    """Runs in a fresh process: RSS after creating, and after warming, N batched streams or N sessions."""
    from .runtime import Session
    from .runtime.manifest import output_period

    if mode == "batched":
        sessions = [Session(artifact, profile=profile, backend="onnxruntime", streams=n, threads=threads,
                            max_batch=max_batch)]
    else:
        sessions = [Session(artifact, profile=profile, backend="onnxruntime", threads=threads) for _ in range(n)]
    _trim_heap()
    created = _rss_bytes()  # weights, sessions and the runtime's own buffers, before any activation
    data = _frames(_frame_shape(sessions[0].manifest), n)
    for i in range(WARMUP_CALLS * output_period(sessions[0].manifest)):  # every stage has run, its activations held
        if mode == "batched":
            sessions[0].step_batch(data[i % DISTINCT_FRAMES])
        else:
            for s, sess in enumerate(sessions):
                sess.step(data[i % DISTINCT_FRAMES, s])
    del data
    gc.collect()
    _trim_heap()
    return {"rss_bytes": _rss_bytes(), "rss_created_bytes": created}


def _run_child(artifact: Path, mode: str, n: int, profile: str, threads: int | None,
               max_batch: int | None = None) -> dict[str, int]:
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, whatever else is installed
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import numpy, onnxruntime, edge3d.runtime; "
            "from edge3d.bench_streams import rss_child; a = sys.argv; "
            "print(json.dumps(rss_child(a[2], a[3], int(a[4]), a[5], int(a[6]) or None, int(a[7]) or None)))")
    args = [root, str(artifact), mode, str(n), profile, str(threads or 0), str(max_batch or 0)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"RSS child ({mode}, {n} streams) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_points(artifact: Path, streams: list[int], profile: str, threads: int | None,
                repeats: int, max_batch: int | None = None) -> dict[tuple[str, int], dict[str, int]]:
    """Median RSS figures per (mode, N); N=1 is always measured as the baseline."""
    out = {}
    for mode in ("batched", "separate"):
        for n in sorted({1, *streams}):
            if mode == "separate" and n == 1:
                out[(mode, 1)] = out[("batched", 1)]  # one session with one stream either way
                continue
            runs = [_run_child(artifact, mode, n, profile, threads, max_batch if mode == "batched" else None)
                    for _ in range(repeats)]
            out[(mode, n)] = {k: int(statistics.median(r[k] for r in runs)) for k in runs[0]}
    return out


def measure_streams(artifact_path: str | Path, streams: list[int], frames: int, *, profile: str = "fp32",
                    threads: int | None = None, rss: bool = True, rss_repeats: int = 3,
                    max_batch: int | None = None, spin: bool = True) -> dict[str, Any]:
    """Batched vs separate sessions for every N in ``streams``: throughput, gather/scatter, memory.

    ``max_batch`` runs the batched session in chunks (``Session(max_batch=...)``), the
    memory-lean scheme for many streams; None steps all N in one ping-pong call. ``spin=False``
    times every session with ONNX Runtime's pool threads sleeping between runs (``Session(spin=False)``).

    ``frames`` is the number of timed calls per mode and N (each batched call steps N frames).
    Returns a JSON-able dict: ``rows`` (one per N), the per-stream byte counts the memory
    figures are compared with, and ``method`` (how each number was measured).
    """
    from .runtime import Session
    from .runtime.manifest import output_period, resolve_artifact

    if not streams or any(not isinstance(n, int) or n < 1 for n in streams):
        raise ValueError(f"streams must be positive integers, e.g. 1,2,4,8; got {streams!r}.")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}.")
    artifact = resolve_artifact(artifact_path)
    probe = Session(artifact, profile=profile, backend="onnxruntime", threads=threads)
    manifest = probe.manifest
    state_bytes = probe.cache_bytes
    runtime_bytes = None  # a multi-rate session's buffers are laid out per stage: not this formula
    if "stages" not in manifest:
        # What the runtime itself allocates per batched stream: two state sets (ping-pong), one frame
        # row and one output row. A subset call adds two more state sets (staging). With max_batch,
        # one state set per stream; the staging pair is fixed at max_batch rows.
        be = probe._backend
        frame_bytes = int(np.prod(be.frame_shape)) * be.frame_dtype.itemsize
        output_bytes = int(np.prod(be.output_shape)) * be.output_dtype.itemsize
        runtime_bytes = (1 if max_batch else 2) * state_bytes + frame_bytes + output_bytes
    probe.close()
    rows = []
    for n in streams:
        rows.append({"streams": n, **_time_point(artifact, n, frames, profile, threads, max_batch, spin)})
    if rss:
        points = _rss_points(artifact, streams, profile, threads, rss_repeats, max_batch)
        base = points[("batched", 1)]
        measured = sorted({1, *streams})
        for row in rows:
            n = row["streams"]
            batched, separate = points[("batched", n)], points[("separate", n)]
            row["rss_batched_bytes"] = batched["rss_bytes"]
            row["rss_separate_bytes"] = separate["rss_bytes"]
            if n > 1:
                per_batched = (batched["rss_bytes"] - base["rss_bytes"]) / (n - 1)
                row["rss_per_extra_batched_stream"] = per_batched
                # a model without temporal layers has no state to be a multiple of
                row["rss_per_extra_batched_stream_over_state"] = per_batched / state_bytes if state_bytes else None
                # before the first step: what the runtime allocates (state ping-pong, frame, output);
                # the rest of per_batched is ONNX Runtime's activation memory for one more batch row
                row["rss_per_extra_batched_stream_before_steps"] = (
                    (batched["rss_created_bytes"] - base["rss_created_bytes"]) / (n - 1))
                row["rss_per_extra_session"] = (separate["rss_bytes"] - base["rss_bytes"]) / (n - 1)
                # the slope from the next smaller N: what one more stream costs at this size, without
                # the fixed cost of the first chunk (its staging rows and activations) spread over it
                prev = measured[measured.index(n) - 1]
                row["rss_per_extra_batched_stream_marginal"] = (
                    (batched["rss_bytes"] - points[("batched", prev)]["rss_bytes"]) / (n - prev))
    return {
        "artifact": str(artifact),
        "model": manifest.get("name"),
        "frame": [manifest["frame"]["channels"], manifest["frame"]["height"], manifest["frame"]["width"]],
        "profile": profile,
        "backend": "onnxruntime",
        "threads": threads,
        "max_batch": max_batch,
        "spin": spin,
        "host": host_info(),
        "timed_calls": frames,
        "state_bytes_per_stream": state_bytes,
        "state_bytes_without_input_history": manifest.get("state_bytes"),
        "runtime_buffer_bytes_per_stream": runtime_bytes,
        "frames_per_call": output_period(manifest),
        "weight_bytes": manifest["precisions"].get(profile, {}).get("weight_bytes"),
        "rows": rows,
        "method": {
            "throughput": "median wall ms per call, the modes interleaved call by call; separate = N "
                          "one-stream Sessions stepped one after another on the same frames; *_cpu_* = median "
                          "process CPU ms of the same calls; a call steps frames_per_call frames of each stream "
                          "(a multi-rate artifact: one cycle of its stages, output_period frames)",
            "gather_scatter": "backend.gather + backend.scatter of all N rows in shuffled order, timed alone, "
                              "over the median full in-order call of the same N; subset_over_full = a shuffled "
                              "call of all N streams (gather, run, scatter) over the in-order call, interleaved",
            "rss": f"fresh child process per point, median of {rss_repeats}; /proc/self/statm after "
                   f"{WARMUP_CALLS} warm-up full calls and malloc_trim(0) (*_before_steps: after creating the "
                   "session(s), before any call); per extra stream = (RSS(N) - RSS(1)) / (N - 1); marginal = "
                   "(RSS(N) - RSS(M)) / (N - M) with M the next smaller N measured",
        },
    }


def format_rows(report: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """Table rows for the CLI, one per N: throughput (THROUGHPUT_HEADERS) and memory (MEMORY_HEADERS).

    Two tables, because eleven columns do not fit an 80-column terminal, nor a log (rich lays out
    piped output 80 wide), and rich would cut the numbers short to make them fit.
    """
    state = report["state_bytes_per_stream"]

    def mb(row: dict[str, Any], key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v / 1e6:.2f}"

    def times(row: dict[str, Any], key: str) -> str:
        v = row.get(key)
        return "-" if v is None or not state else f"{v / state:.2f}x"

    def share(row: dict[str, Any]) -> str:  # None for a multi-rate artifact, whose calls take every stream
        v = row.get("gather_scatter_share")
        return "-" if v is None else f"{100 * v:.1f}%"

    speed = [[str(r["streams"]), f"{r['batched_fps']:.1f}", f"{r['separate_fps']:.1f}",
              f"{r['batched_over_separate']:.2f}x", f"{r['batched_over_separate_cpu']:.2f}x",
              f"{r['batched_ms_per_call']:.1f}", share(r)] for r in report["rows"]]
    memory = [[str(r["streams"]), mb(r, "rss_per_extra_batched_stream"), times(r, "rss_per_extra_batched_stream"),
               mb(r, "rss_per_extra_batched_stream_marginal"), mb(r, "rss_per_extra_batched_stream_before_steps"),
               mb(r, "rss_per_extra_session")] for r in report["rows"]]
    return speed, memory


THROUGHPUT_HEADERS = ["N", "fps batched", "fps separate", "gain", "gain CPU", "ms/call", "gather+scatter"]
MEMORY_HEADERS = ["N", "extra stream", "x state", "marginal", "before steps", "extra session"]
MEMORY_CAPTION = ("x state: the extra stream over its state bytes; marginal: from the next smaller N; "
                  "before steps: once the session exists, before its first call")
