"""``edge3d bench``: the performance contract, measured as ratios within one process run.

Timings on shared machines are noisy, so every figure is a median over many frames and the
report's value is in the ratios between measurements taken side by side.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .bench_streams import host_info, interleaved_times

MATMUL_N = 2048  # the yardstick MatMul is MATMUL_N × MATMUL_N float32
WINDOW = 16  # the sliding window the step is compared with, as the contract states it
PROFILE = "profile."  # the timings of --profiles, by precision: "profile.fp16", "profile.int8", ...
# The performance contract's targets, set for d-resnet18 at 112×112 on ONNX Runtime CPU (issue #6);
# other models and sizes have none, and show these only for comparison.
TARGETS = {"step_gflops_vs_matmul": ">= 0.7", "lowered_vs_conv3d_speedup": ">= 1.25",
           "step_vs_window_speedup": ">= 16", "exported_vs_eager_speedup": ">= 3", "session_overhead_pct": "<= 3"}


def _in_rounds(groups: list[tuple[dict[str, Callable[[int], Any]], int]], rounds: int,
               warmup: int = 3, pause_s: float = 0.2) -> list[dict[str, list[float]]]:
    """Wall ms of every timed call, round by round: ``[round][measurement] -> [ms, ...]``.

    Every group is taken in turn, ``rounds`` times over.

    On a shared machine a slow spell lasts seconds; timing one measurement after another lets a
    spell land on one of them alone and skew its ratio to the others by 20-40% (seen here).
    Taking a block of each in every round spreads a spell over all of them. Within a group the
    functions alternate call by call (for ratios that must be tight, e.g. Session vs bare call).
    A pause and warm-up calls before each block let the previous block's ONNX Runtime or
    OpenMP pool threads stop spinning and refill the caches (the first calls after a switch took
    1.5-3× as long here), so no measurement pays for its neighbour.
    """
    per_round: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        this_round: dict[str, list[float]] = {}
        for group, calls in groups:
            time.sleep(pause_s)
            for fn in group.values():
                for i in range(warmup):
                    fn(i)
            wall, _cpu = interleaved_times(group, calls)
            this_round.update(wall)
        per_round.append(this_round)
    return per_round


def _ratios(ms: dict[str, float], macs: int) -> dict[str, float]:
    """The contract's ratios from one round's median timings (the overhead comes from pairs)."""
    step = ms["step"]
    ratios = {"step_gflops_vs_matmul": (2 * macs / step) / (2 * MATMUL_N**3 / ms["matmul"])}
    for name, key in (("lowered_vs_conv3d_speedup", "conv3d"), ("step_vs_window_speedup", "window")):
        if key in ms:
            ratios[name] = ms[key] / step
    if "eager" in ms:  # against the faster of PyTorch's two step loops: the baseline never flatters the step
        ratios["exported_vs_eager_speedup"] = min(ms["eager"], ms["eager_conv3d"]) / step
    for key in ms:  # each precision against the FP32 step
        if key.startswith(PROFILE):
            ratios[f"{key.removeprefix(PROFILE)}_vs_fp32_speedup"] = step / ms[key]
    return ratios


def _paired_overhead_pct(step: npt.ArrayLike, bare: npt.ArrayLike) -> float:
    """Session overhead from each Session call against the bare call right after it.

    The two alternate call by call, so each pair shares the machine's state of that moment;
    the median of the pairs' ratios ignores how the machine's speed moved between pairs, which
    a ratio of two medians does not (a 1% overhead read as 3.6% here when rounds ran at
    different speeds and the two medians fell in different rounds).
    """
    return 100.0 * (float(np.median(np.asarray(step) / np.asarray(bare))) - 1.0)


def _summarise(per_round: list[dict[str, list[float]]], macs: int
               ) -> tuple[dict[str, float], list[dict[str, float]], dict[str, float], dict[str, list[float]]]:
    """Pooled median ms, each round's median ms, the ratios, and each ratio's range over the rounds.

    A ratio is taken within each round (its measurements seconds apart) and the report gives the
    median over the rounds: the machine's speed moves between rounds far more than within one,
    and a ratio of pooled medians can pair one measurement's fast round with another's slow one.
    """
    names = list(per_round[0])
    pooled = {n: np.concatenate([r[n] for r in per_round]) for n in names}
    ms = {n: float(np.median(t)) for n, t in pooled.items()}
    round_ms = [{n: float(np.median(r[n])) for n in names} for r in per_round]
    by_round = [{"session_overhead_pct": _paired_overhead_pct(r["step"], r["bare"]), **_ratios(med, macs)}
                for r, med in zip(per_round, round_ms, strict=True)]
    # The overhead's own figure pairs every call of every round; the others are the median round's.
    ratios = {"session_overhead_pct": _paired_overhead_pct(pooled["step"], pooled["bare"]),
              **{k: float(np.median([r[k] for r in by_round])) for k in by_round[0] if k != "session_overhead_pct"}}
    ranges = {k: [min(r[k] for r in by_round), max(r[k] for r in by_round)] for k in ratios}
    return ms, round_ms, ratios, ranges


def _proto_field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, text or bytes length-delimited."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def matmul_model(n: int = MATMUL_N) -> bytes:
    """The serialised ONNX model c = a @ b over n×n float32 inputs (opset 18).

    Encoded here, field by field, so that `edge3d bench ARTIFACT` measures its yardstick where only
    the runtime is installed (numpy and onnxruntime, no onnx package), e.g. on a Jetson. Field
    numbers are onnx.proto's; tests parse the bytes with onnx and check them.
    """
    f = _proto_field

    def float_matrix(name: str) -> bytes:  # ValueInfoProto: name, TypeProto.tensor_type(FLOAT, [n, n])
        shape = f(1, f(1, n)) * 2
        return f(1, name) + f(2, f(1, f(1, 1) + f(2, shape)))

    node = f(1, "a") + f(1, "b") + f(2, "c") + f(4, "MatMul")
    graph = f(1, node) + f(2, "mm") + f(11, float_matrix("a")) + f(11, float_matrix("b")) + f(12, float_matrix("c"))
    return f(1, 8) + f(7, graph) + f(8, f(2, 18))  # IR 8, as artifacts are written: onnxruntime 1.17 loads it


def _matmul_call(n: int = MATMUL_N) -> Callable[[int], Any]:
    """An n×n float32 MatMul in ONNX Runtime: the CPU's practical peak, as a yardstick for the step."""
    import onnxruntime as ort

    sess = ort.InferenceSession(matmul_model(n), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return lambda _: sess.run(None, {"a": a, "b": a})


class WindowNotExported(Exception):
    """torch.onnx could not export the clip forward; the message says which op, in a few words."""


def _window_session(model, shape: tuple[int, int, int], window: int, folder: Path):
    """ONNX of the clip model over a fixed window: what sliding-window inference runs per frame.

    The clip forward is the user's own code, and torch.onnx has no ONNX function for every op it
    may use (``aten._adaptive_avg_pool3d``, for one, which edge3d's step conversion handles): the
    step is still worth timing, so that failure is raised as :class:`WindowNotExported`, not as
    torch.onnx's page of traceback.
    """
    import re

    import onnxruntime as ort
    import torch

    from .exporters.onnx import quiet

    clip = torch.zeros(1, shape[0], window, *shape[1:])
    path = folder / "window.onnx"
    try:
        with quiet():
            torch.onnx.export(model.eval(), (clip,), str(path), input_names=["clip"], output_names=["scores"],
                              opset_version=18, dynamo=True, verbose=False)
    except MemoryError:
        raise
    except Exception as e:
        op = re.search(r"op='([^']+)'", str(e))
        raise WindowNotExported(f"torch.onnx has no ONNX function for {op.group(1)}" if op else
                                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}") from e
    so = ort.SessionOptions()
    so.log_severity_level = 4  # a window too long for the memory is raised, and said in one sentence
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), clip.numpy()


def _check_window(model: Any, target: str, shape: tuple[int, int, int], window: int) -> None:
    """A window shorter than a multi-rate model's output period holds no output to time."""
    from .convert import to_step
    from .staged import is_multirate

    if is_multirate(model):
        period = to_step(model, shape).periods[-1]
        if window < period:
            raise ValueError(f"--window {window} is shorter than {target}'s output period ({period} frames), so the "
                             f"window's clip forward gives no output; pass --window {period} or more.")


def run_bench(target: str, *, classes: int | None = None, size: int | tuple[int, int] | None = None,
              width: float | None = None, head: str | None = None, channels: int | None = None, frames: int = 100,
              window: int | None = None, streams: list[int] | None = None,
              rounds: int = 5, verify: bool = True, log: Any = None,
              profiles: list[str] | None = None) -> dict[str, Any]:
    """Measure the step graph against the alternatives a user has; see README "Benchmarks".

    ``verify`` runs the export's step check on the lowered graph only: the Conv3d graph is the same
    step exported without lowering, kept for its speed, and checking it too would add a second
    model run to every bench.

    A multi-rate model (one output every P frames) is timed in whole cycles of its stages, each
    call P frames, and every time is reported per frame: a median over single frames would time
    stage 0 alone. The sliding window, which needs one clip forward per output, then runs once per
    P frames, so ``step_vs_window_speedup`` compares the cost of an output both ways. ``window``
    left out is 16 frames, or P where P is longer.

    ``profiles`` (precisions other than fp32) are each timed in a block of its own in every round,
    as the Conv3d graph is, for the contract's "INT8 and FP16 vs FP32" ratios: an artifact's own
    precisions where left out, or built into the temporary export of a model (INT8 calibrated on
    synthetic frames). Not call by call beside FP32: sessions stepped in turn spin their ONNX Runtime
    threads against each other, and full-size d-resnet18's FP32 step took 20.1 ms so, 7.0 ms alone.
    """
    from .runtime import Session
    from .runtime.manifest import load_manifest, output_period

    for name, value in (("--frames", frames), ("--rounds", rounds), ("--window", window)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value}); the defaults are 100 frames, 5 rounds, "
                             "a 16-frame window.")

    def say(msg: str) -> None:
        if log is not None:
            log.print(msg)

    results: dict[str, float] = {}
    not_measured: dict[str, str] = {}  # a measurement left out, and why
    rng = np.random.default_rng(0)
    is_artifact = (Path(target) / "manifest.json").is_file()
    with tempfile.TemporaryDirectory(prefix="edge3d-bench-") as tmp:
        folder = Path(tmp)
        model = None
        if is_artifact:
            artifact = Path(target)
        else:
            import torch

            from .exporters.onnx import export_artifact, frame_hw
            from .models import build_model, check_channels, frame_channels

            check_channels(channels)
            torch.manual_seed(0)
            model = build_model(target, num_classes=classes, frame_size=size, width=width, head=head)
            size = size or getattr(model, "frame_size", 112)
            c = frame_channels(model, channels)
            if profiles:  # a misspelt name before two exports, not after
                from .exporters.precision import resolve_profiles

                resolve_profiles(profiles)
            if window is not None:  # before two exports, not after
                _check_window(model, target, (c, *frame_hw(size)), window)
            say(f"exporting {target} (2D-lowered and Conv3d step graphs)...")
            artifact = export_artifact(model, folder, "lowered", frame_size=size, channels=c, verify=verify)
            naive = export_artifact(model, folder, "conv3d", frame_size=size, channels=c, lower=False, verify=False)
            if profiles:
                from .exporters.precision import add_precisions

                say(f"building {', '.join(p for p in profiles if p != 'fp32')}...")
                add_precisions(artifact, [p for p in profiles if p != "fp32"])
        manifest = load_manifest(artifact)
        if profiles is None:  # an artifact's own precisions
            profiles = [p for p in manifest["precisions"] if p != "fp32"] if model is None else []
        profiles = [p for p in dict.fromkeys(profiles) if p != "fp32"]
        precise = {p: Session(artifact, profile=p) for p in profiles}  # a precision it lacks is named here
        period = output_period(manifest)  # frames per output, and per timed call
        window = max(WINDOW, period) if window is None else window
        f = manifest["frame"]
        shape = (f["channels"], f["height"], f["width"])
        clip_frames = rng.standard_normal((frames + 8, *shape), dtype=np.float32)
        it = iter(range(10**9))

        def next_frame() -> np.ndarray:
            return clip_frames[next(it) % len(clip_frames)]

        sess = Session(artifact)

        def cycle(fn: Callable[[int], Any]) -> Callable[[int], Any]:
            """One timed call steps a whole cycle of a multi-rate model's stages (P frames)."""
            if period == 1:
                return fn

            def call(i: int) -> None:
                for _ in range(period):
                    fn(i)
            return call

        def calls(frames_per_round: int, least: int) -> int:  # timed calls per round, in cycles
            return max(least, -(-frames_per_round // period))

        # The bare call runs the same graph (same InferenceSession, so the same thread pool)
        # on the same inputs; alternating the two call by call keeps noise out of their ratio.
        if period > 1:
            bare = sess.bare_cycle()
        else:
            backend = sess._backend
            feeds = {"frame": clip_frames[:1]}
            feeds.update({s["input"]: v for s, v in zip(manifest["states"], backend.read_states().values(),
                                                           strict=True)})

            def bare(_: int) -> Any:
                return backend.run_bare(feeds)
        per_round = calls(frames // rounds, 1)
        groups: list[tuple[dict[str, Callable[[int], Any]], int]] = [
            ({"step": cycle(lambda _: sess.step(next_frame())), "bare": bare}, per_round),
            ({"matmul": _matmul_call()}, 2),
        ]
        for p, s in precise.items():
            groups.append(({PROFILE + p: cycle(lambda _, s=s: s.step(next_frame()))}, per_round))
        if model is not None:
            import torch

            from .convert import to_step

            say(f"exporting the {window}-frame sliding window...")
            sess3d = Session(naive)
            try:
                wsess, clip = _window_session(model, shape, window, folder)
            except WindowNotExported as e:
                wsess = None
                not_measured["window"] = (f"the {window}-frame window's clip forward did not export to ONNX ({e}), "
                                          "so step_vs_window_speedup is left out")
                say(f"[yellow]{not_measured['window']}[/]")
            # PyTorch's step loop two ways: edge3d's lowered step (Conv2d over the stacked cache) and the
            # model's own causal Conv3d over its cached frames, as a user without edge3d steps it. On
            # host C the Conv3d form ran 1.13x faster in eager mode (15.2 vs 17.1 ms, d-resnet18),
            # the opposite of ONNX Runtime, so the speedup is taken against whichever is faster.
            tframes = torch.from_numpy(clip_frames)

            def eager_loop(step: Any) -> Callable[[int], None]:
                if period > 1:  # a StagedStepModule: PyTorch runs the stages on the runtime's schedule
                    carry = step.init_carry(1)

                    def staged(_: int) -> None:
                        nonlocal carry
                        with torch.inference_mode():
                            _, carry = step.step(tframes[next(it) % len(tframes)][None], carry)
                    return cycle(staged)
                states = step.initial_states(1)

                def call(_: int) -> None:
                    nonlocal states
                    with torch.inference_mode():  # PyTorch's fastest eager path: ~2% under no_grad here
                        _, *states = step(tframes[next(it) % len(tframes)][None], *states)
                return call

            eager = eager_loop(to_step(model, shape))
            eager_conv3d = eager_loop(to_step(model, shape, keep_time=True, lower=False))

            groups.append(({"conv3d": cycle(lambda _: sess3d.step(next_frame()))}, per_round))
            if wsess is not None:  # one clip forward per output: once per cycle of a multi-rate model
                groups.append(({"window": lambda _: wsess.run(None, {"clip": clip})}, calls(frames // 4 // rounds, 2)))
            groups.append(({"eager": eager, "eager_conv3d": eager_conv3d}, calls(frames // 2 // rounds, 4)))
        say(f"timing {', '.join(n for g, _ in groups for n in g)} in {rounds} interleaved round{'s' if rounds != 1 else ''}"
            + (f", each call a cycle of {period} frames" if period > 1 else "") + "...")
        macs = manifest["macs_per_frame"]
        timed = _in_rounds(groups, rounds)
        if period > 1:  # per frame: a cycle's time (or the window's, once per cycle) over its P frames
            timed = [{n: v if n == "matmul" else [x / period for x in v] for n, v in r.items()} for r in timed]
        ms, round_ms, ratios, ratio_range = _summarise(timed, macs)
        results["step_ms"], results["bare_ort_ms"] = ms["step"], ms["bare"]
        results["step_gflops"] = 2 * macs / (results["step_ms"] * 1e-3) / 1e9
        results["matmul_gflops"] = 2 * MATMUL_N**3 / (ms["matmul"] * 1e-3) / 1e9
        for name, key in (("conv3d_step_ms", "conv3d"), ("window_ms_per_output_frame", "window"),
                          ("torch_eager_lowered_step_ms", "eager"), ("torch_eager_conv3d_step_ms", "eager_conv3d")):
            if key in ms:
                results[name] = ms[key] * (period if key == "window" else 1)  # one window per output
        if "eager" in ms:  # the baseline of exported_vs_eager_speedup
            results["torch_eager_step_ms"] = min(ms["eager"], ms["eager_conv3d"])
        for key in ms:
            if key.startswith(PROFILE):
                results[f"{key.removeprefix(PROFILE)}_step_ms"] = ms[key]
        report: dict[str, Any] = {
            "target": target, "frame": list(shape), "macs_per_frame": macs,
            "cache_bytes_per_stream": sess.cache_bytes, "frames": frames, "rounds": rounds, "window": window,
            "output_period": period,
            "results": results, "ratios": ratios, "ratio_range_over_rounds": ratio_range,
            "targets_for_d_resnet18_112": {k: TARGETS[k] for k in ratios if k in TARGETS},
            "profiles": ["fp32", *profiles] if profiles else [],
            "ms_by_round": round_ms, "host": host_info(), "not_measured": not_measured,
        }
        if streams:
            from .bench_streams import measure_streams

            report["streams"] = measure_streams(artifact, streams, frames)
        sess.close()
        for s in precise.values():
            s.close()
    return report
