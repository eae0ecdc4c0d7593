"""Compare the precisions of one artifact against FP32 on a real stream (numpy + runtime only).

A quantised *stateful* model has two kinds of error, and they must be told apart:

- **teacher-forced per-step error**: each profile's graph is fed the FP32 run's states before
  every step, so the error is what one step adds, with no history of its own mistakes;
- **free-running drift**: each profile carries its own state, as it will in the field, so
  errors that feed back through recurrent states or running sums can accumulate.

A profile whose free-running error grows over the stream while its teacher-forced error stays
flat has a state problem (e.g. a sum that loses precision), not a layer problem. Both are
reported per profile together with latency, cache bytes, top-1 agreement with FP32 and, where
the source has labels, accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .bench_streams import host_info, host_line
from .profiles import split_names
from .runtime import Session
from .runtime.manifest import (
    format_bytes,
    is_positive_int,
    json_safe,
    load_manifest,
    output_map,
    output_period,
    precision_entry,
    require_single_graph,
    state_io_names,
)
from .runtime.preprocess import fit_note
from .runtime.rate import check_images_fps, rate_note
from .signals import Terminated
from .sources import labels_apply, split_item, streams_of

REFERENCE = "fp32"


def cast_states(states: dict[str, np.ndarray], entry: dict[str, Any], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """FP32 states in the dtypes of one precision: float16 by rounding, int8 with its state scales."""
    quant = entry.get("state_quant") or {}
    out = {}
    for name, a in states.items():
        dt = np.dtype(dtypes[name])
        if name in quant and dt.kind in "iu":
            q = quant[name]
            info = np.iinfo(dt)
            v = np.rint(a / float(q["scale"])) + int(q.get("zero_point", 0))
            out[name] = np.clip(v, info.min, info.max).astype(dt)
        else:
            with np.errstate(over="ignore"):  # a state beyond float16's range becomes inf, as in the graph
                out[name] = a.astype(dt)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite output gives NaN, reported as such
        return float(a @ b / (na * nb))


TREND_FRAMES = 8  # two frames a quarter at least; shorter runs report no growth (NaN, "-" in the table)


def drift_trend(err: np.ndarray, per_step: np.ndarray | None = None) -> dict[str, float]:
    """Is the free-running error still growing at the end of the stream?

    ``growth``: mean error of the last quarter over the mean of the third quarter (about 1 when
    bounded); ``slope_per_1k``: least-squares slope over the second half, per 1000 frames,
    relative to that half's mean error. Both also move with the content (some scenes quantise
    worse), so with the teacher-forced error ``per_step`` of the same frames ``growth_vs_step``
    divides it out: the growth of free-running error *beyond* what one step adds, which is what
    an accumulating state error shows up as.
    """
    n = len(err)
    if n < TREND_FRAMES:
        return {"growth": float("nan"), "slope_per_1k": float("nan"), "growth_vs_step": float("nan")}
    q = n // 4

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else (1.0 if a == 0 else float("inf"))

    q3, q4 = float(err[2 * q:3 * q].mean()), float(err[3 * q:].mean())
    half = err[n // 2:].astype(np.float64)
    x = np.arange(len(half), dtype=np.float64)
    slope = float(np.polyfit(x, half, 1)[0]) if half.std() > 0 else 0.0
    mean = float(half.mean())
    out = {"growth": ratio(q4, q3), "slope_per_1k": slope * 1000 / mean if mean > 0 else 0.0}
    if per_step is not None:
        s3, s4 = float(per_step[2 * q:3 * q].mean()), float(per_step[3 * q:].mean())
        out["growth_vs_step"] = ratio(ratio(q4, s4), ratio(q3, s3))
    return out


class _Recorder:
    """Per-frame errors of one profile, free-running and teacher-forced."""

    def __init__(self) -> None:
        self.free_err: list[float] = []
        self.free_cos: list[float] = []
        self.free_top: list[Any] = []
        self.tf_err: list[float] = []
        self.tf_top: list[Any] = []
        self.nonfinite: dict[str, Any] | None = None  # the first frame whose free-running output is not finite

    def keep(self, n: int, frames: int) -> None:
        """Only the first ``n`` outputs, of the ``frames`` frames every session finished (a Ctrl-C lands
        anywhere)."""
        for series in (self.free_err, self.free_cos, self.free_top, self.tf_err, self.tf_top):
            del series[n:]
        if self.nonfinite is not None and self.nonfinite["frame"] >= frames:
            self.nonfinite = None


FLOAT16_MAX = 65504.0


def _nonfinite_cause(frame: int, sess: Session, ref: Session) -> dict[str, Any]:
    """Where a profile's output first stopped being finite: the state that holds inf/NaN, and how
    large the FP32 reference's states were then (an unbounded recurrence overflows float16)."""
    states = sess.get_state()
    bad = next((k for k, v in states.items() if not np.isfinite(np.asarray(v, np.float32)).all()), None)
    ref_max = max((float(np.abs(v).max()) for v in ref.get_state().values()), default=0.0)
    return {"frame": frame, "state": bad, "reference_max_abs_state": ref_max}


STATE_GROWTH_LIMIT = 10.0


def reference_state_growth(largest: list[float], starts: list[int]) -> dict[str, float] | None:
    """How much the FP32 reference's largest state grew within its longest stream: the mean of the
    last quarter's per-frame maxima over the second quarter's (the first is left out, as a cache
    fills from zeros there).

    A trained model's states are bounded, so this stays near 1 (0.9-1.3 for the zoo models,
    trained or not); an unstable recurrence grows by orders of magnitude (untrained RCN-ResNet-18:
    1.7e5 over 400 frames). Then every profile's error grows with the reference and its drift says
    more about the model than about the precision; ``growth_vs_step`` even reads as bounded, since
    the teacher-forced error grows alike. Running sums (``accumulator`` states) grow by design and
    are left out by the caller.
    """
    bounds = [*starts, len(largest)]
    a, b = max(zip(bounds[:-1], bounds[1:], strict=True), key=lambda ab: ab[1] - ab[0], default=(0, 0))
    seg = np.asarray(largest[a:b], np.float64)
    if len(seg) < 8:
        return None
    seg[np.isnan(seg)] = np.inf  # a state that went NaN had overflowed first
    q = len(seg) // 4
    q2, q4 = float(seg[q:2 * q].mean()), float(seg[3 * q:].mean())
    if not (q2 > 0 and np.isfinite(q2)):
        return None
    return {"ratio": q4 / q2, "max_abs": float(seg[3 * q:].max())}


def report_notes(report: dict[str, Any]) -> list[str]:
    """Sentences under the table: a reference whose state grows without bound, then one per profile
    whose output went inf/NaN, saying where and the likely reason (the reference's own overflow
    first, so that a profile is not blamed for it)."""
    notes = [f"frames: {report['frame_fit']}."] if report.get("frame_fit") else []
    notes += [f"frame rate: {report['frame_rate']}."] if report.get("frame_rate") else []
    growth = report.get("reference_state_growth")
    if growth and growth["ratio"] > STATE_GROWTH_LIMIT:
        rose = (f"rose {growth['ratio']:.3g}x from the second to the last quarter of the stream, to "
                f"{growth['max_abs']:.3g}" if np.isfinite(growth["ratio"]) else "overflowed float32")
        notes.append(f"{REFERENCE}: the reference's own state grows without bound (its largest value {rose}; "
                     "untrained, or an unstable recurrence), so every profile's error grows with it and says "
                     "more about the model than the precision; train or bound the model before judging a "
                     "precision by these figures.")
    ref_nf = report.get("reference_first_nonfinite")
    if ref_nf:
        where = f", where state {ref_nf['state']} overflowed" if ref_nf["state"] else ""
        notes.append(f"{REFERENCE}: the reference's own output is not finite from frame {ref_nf['frame']}{where}; "
                     "no precision can be judged from that frame on.")
    for p, row in report["profiles"].items():
        nf = row["free_running"].get("first_nonfinite")
        if not nf or p == REFERENCE:
            continue
        where = f", where state {nf['state']} overflowed" if nf["state"] else ""
        if ref_nf and ref_nf["frame"] <= nf["frame"]:
            notes.append(f"{p}: the output is not finite from frame {nf['frame']}, after the FP32 reference's "
                         f"(frame {ref_nf['frame']}): the model overflows, not this precision.")
            continue
        text = (f"{p}: the output is not finite from frame {nf['frame']}{where}; the FP32 reference's largest "
                f"state was {nf['reference_max_abs_state']:.3g} then")
        if nf["reference_max_abs_state"] > FLOAT16_MAX and "float16" in row["state_dtypes"]:
            text += (f", beyond float16's largest value ({FLOAT16_MAX:.0f}): the model's state grows without "
                     "bound (untrained, or an unstable recurrence), so bound it or train it before using this "
                     "precision.")
        else:
            text += "."
        notes.append(text)
    return notes


def compare(
    artifact: str | Path,
    profiles: str | list[str] | tuple[str, ...],
    source: str | Iterable[Any],
    frames: int,
    *,
    out_dir: str | Path | None = None,
    save_polygraphy_inputs: bool = False,
    polygraphy_frames: int = 4,
    plots: bool = True,
    threads: int | None = None,
    progress: Any = None,
    images_fps: float | None = None,
) -> dict[str, Any]:
    """Stream ``frames`` frames of ``source`` through every profile; return (and write) the report.

    ``source`` is a source spec (video, folder of videos - one stream each -, synthetic[:SEED])
    or an iterable of frames / ``(frame, label)`` pairs. ``threads``: ONNX Runtime intra-op
    threads per session; 1 keeps the 2N+1 lockstep sessions from contending (ORT's idle thread
    pools spin). ``out_dir`` receives report.json,
    report.md, drift.png and latency.png (and Polygraphy input files if asked).
    ``progress(n)`` is called once per frame. ``images_fps`` is the rate a source's folders of images
    were extracted at, so that they are paced to the artifact's frame rate as videos are.

    A multi-rate artifact is compared on the frames where its slowest stage runs, those that produce
    an output (``report["outputs"]``): between them ``step`` repeats the last output, which a
    teacher-forced step would get from the reference itself.
    """
    if not is_positive_int(frames):
        raise ValueError(f"--frames must be an integer of at least 1, got {frames!r}.")
    if save_polygraphy_inputs and not is_positive_int(polygraphy_frames):
        raise ValueError(f"polygraphy_frames must be an integer of at least 1, got {polygraphy_frames!r}.")
    if save_polygraphy_inputs:
        import importlib.util

        if importlib.util.find_spec("polygraphy") is None:
            raise ValueError("--save-polygraphy-inputs needs polygraphy; pip install polygraphy "
                             "(or edge3d[tensorrt]).")
    manifest = load_manifest(artifact)
    images_fps = check_images_fps(images_fps, manifest, artifact)  # before any session is opened
    if save_polygraphy_inputs:  # Polygraphy runs one graph on one set of inputs
        require_single_graph(manifest, "--save-polygraphy-inputs")
    names = list(dict.fromkeys(split_names(profiles)))
    if not names:
        raise ValueError("no profiles to compare; pass e.g. --profiles fp32,fp16,int8.")
    for p in names:
        precision_entry(manifest, p)  # a clear error for a profile the artifact lacks
    others = [p for p in names if p != REFERENCE]
    ref = Session(artifact, REFERENCE, backend="onnxruntime", threads=threads)
    free = {p: Session(artifact, p, backend="onnxruntime", threads=threads) for p in others}
    forced = {p: Session(artifact, p, backend="onnxruntime", threads=threads) for p in others}
    dtypes = {p: s.state_dtypes() for p, s in forced.items()}
    rec = {p: _Recorder() for p in others}
    ref_top: list[Any] = []  # per frame, the class index (or per position of a map)
    bounded = [st["name"] for st in manifest["states"] if st.get("kind") != "accumulator"]
    ref_largest: list[float] = []  # per frame, the reference's largest |state| (running sums apart)
    ref_nonfinite: dict[str, Any] | None = None
    labels: list[int | None] = []
    out_scale = 0.0
    buf = np.empty(ref.pre.shape, np.float32)
    # a folder of one folder per class labels its clips, scoring each precision's accuracy on them
    # at the rate the model takes frames (manifest frame.fps), as `edge3d run` and the camera app feed them
    description, streams = streams_of(source, int(manifest["frame"]["height"]),
                                      (manifest.get("output") or {}).get("classes"), manifest["frame"].get("fps"),
                                      images_fps)
    samplers: list[Any] = []  # each clip's choice of frames at that rate, for the report
    # a map (segmentation, heatmaps) has a class per position: agreement is counted per position, and a
    # source's per-frame labels cannot score it
    is_map = output_map(manifest) is not None
    keep_labels = labels_apply(source, manifest) and not is_map

    def top(y: np.ndarray) -> Any:
        return y.argmax(axis=0) if is_map else int(y.argmax())
    pick = {int((i + 1) * frames / max(polygraphy_frames, 1)) - 1 for i in range(polygraphy_frames)}
    recorded: list[dict[str, np.ndarray]] = []
    boundaries: list[int] = []  # the first output of each stream
    ends: list[int] = []  # the last output of each stream played to its end
    n = 0  # frames stepped
    kept = 0  # outputs compared: every frame's, or a multi-rate model's fresh ones
    at: list[int] = []  # the frame of each output compared
    interrupted = False
    interrupted_by = None
    try:
        try:
            for _, stream in streams:
                if n >= frames:
                    break
                boundaries.append(kept)
                for s in [ref, *free.values()]:
                    s.reset()
                if (sampler := getattr(stream, "sampler", None)) is not None:
                    samplers.append(sampler)
                for item in stream:
                    frame, label = split_item(item)
                    ref.pre(np.asarray(frame), buf)
                    states = ref.get_state()
                    largest = max((float(np.abs(states[k]).max()) for k in bounded), default=0.0)
                    if save_polygraphy_inputs and n in pick:
                        recorded.append({"frame": buf[None].copy(),
                                         **{state_io_names(k)[0]: v for k, v in states.items()}})
                    y = ref.step(buf).astype(np.float32)
                    outs = {}
                    for p in others:
                        yf = free[p].step(buf).astype(np.float32)
                        forced[p].set_state(cast_states(states, free[p].precision, dtypes[p]))
                        outs[p] = yf, forced[p].step(buf).astype(np.float32)
                    if getattr(ref, "last_fresh", True):  # a multi-rate model's output, not a repeat of it
                        ref_largest.append(largest)
                        at.append(n)
                        if ref_nonfinite is None and not np.isfinite(y).all():
                            ref_nonfinite = _nonfinite_cause(n, ref, ref)
                        out_scale = max(out_scale, float(np.abs(y).max()))
                        ref_top.append(top(y))
                        labels.append(label if keep_labels else None)
                        for p, (yf, yt) in outs.items():
                            r = rec[p]
                            r.free_err.append(float(np.abs(yf - y).max()))
                            r.free_cos.append(_cosine(yf, y))
                            r.free_top.append(top(yf))
                            if r.nonfinite is None and not np.isfinite(yf).all():
                                r.nonfinite = _nonfinite_cause(n, free[p], ref)
                            r.tf_err.append(float(np.abs(yt - y).max()))
                            r.tf_top.append(top(yt))
                        kept += 1
                    n += 1
                    if progress is not None:
                        progress(1)
                    if n >= frames:
                        break
                else:  # played to its end: its last output is the clip's prediction
                    if kept > boundaries[-1]:
                        ends.append(kept - 1)
        except KeyboardInterrupt as e:
            # Ctrl-C on a long comparison reports the frames every profile finished, as `run` does
            if n == 0:
                raise
            interrupted = True
            interrupted_by = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
            del ref_top[kept:], labels[kept:], ref_largest[kept:], at[kept:]
            boundaries[:] = [b for b in boundaries if b < kept]  # a stream that had begun no output
            for r in rec.values():
                r.keep(kept, n)
            if ref_nonfinite is not None and ref_nonfinite["frame"] >= n:
                ref_nonfinite = None
        if n == 0:
            raise ValueError(f"source {description!r} gave no frames; check the file, folder or camera.")
        if kept == 0:
            rate = output_period(manifest)
            raise ValueError(f"{n} frames of {description!r} gave no output to compare: this multi-rate model's "
                             f"slowest stage first runs on frame {rate} of each clip; pass --frames {rate} or more "
                             "(and clips at least that long).")
        report = _report(manifest, names, description, kept, boundaries, ref, free, rec, ref_top, labels, out_scale,
                         threads, ends)
        report["frames"], report["outputs"] = n, kept
        for row in report["profiles"].values():  # a frame of the source, not the count of outputs before it
            row["free_running"]["worst_frame"] = at[row["free_running"]["worst_frame"]]
        report["reference_state_growth"] = reference_state_growth(ref_largest, boundaries)
        report["reference_first_nonfinite"] = ref_nonfinite
        # the accuracies above are of frames fitted so: squeezed ones, where the model was trained on crops
        report["frame_fit"] = fit_note(ref.pre.sizes, manifest["frame"], manifest["_folder"])
        report["frame_rate"] = rate_note(samplers, manifest["frame"].get("fps"))
        report["interrupted"] = interrupted
        report["interrupted_by"] = interrupted_by  # SIGINT (Ctrl-C) or SIGTERM; the CLI's exit code tells them apart
        # the ms/frame of each precision depend on the CPU (INT8 on VNNI or AMX, say): name it, as bench does
        report["host"] = host_info()
        if REFERENCE in report["profiles"]:
            report["profiles"][REFERENCE]["free_running"]["first_nonfinite"] = ref_nonfinite
        latencies = {p: (ref if p == REFERENCE else free[p]).frame_ms() for p in names}
    finally:
        for s in [ref, *free.values(), *forced.values()]:
            s.close()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if save_polygraphy_inputs:
            report["polygraphy_inputs"] = _save_polygraphy(out, manifest, names, recorded, free, dtypes)
        if plots:
            try:
                report["plots"] = _plots(out, report, rec, latencies)
            except ImportError:
                report["plots"] = []
                report["plots_skipped"] = "matplotlib is not installed (pip install 'edge3d[plots]')"
        np.savez_compressed(out / "series.npz", **{f"{p}.{k}": np.asarray(getattr(rec[p], k)) for p in others
                                                  for k in ("free_err", "free_cos", "tf_err")})
        (out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
        (out / "report.md").write_text(markdown(report))
    return report


def _report(manifest: dict[str, Any], names: list[str], description: str, n: int, boundaries: list[int],
            ref: Session, free: dict[str, Session], rec: dict[str, _Recorder], ref_top: list[Any],
            labels: list[int | None], out_scale: float, threads: int | None, ends: list[int]) -> dict[str, Any]:
    ref_top_a = np.asarray(ref_top)
    lab = np.asarray([-1 if v is None else v for v in labels])
    has_labels = bool((lab >= 0).any())
    # a folder of labelled clips: each clip is also scored by the prediction it ends on
    clip_ends = [e for e in ends if lab[e] >= 0] if len(boundaries) > 1 else []
    rows: dict[str, Any] = {}
    for p in names:
        sess = ref if p == REFERENCE else free[p]
        ms = sess.frame_ms()
        p50, p95 = np.percentile(ms, [50, 95]) if len(ms) else (0.0, 0.0)
        entry = sess.precision
        row: dict[str, Any] = {
            "ms_p50": float(p50), "ms_p95": float(p95), "cache_bytes": sess.cache_bytes,
            "weight_bytes": int(entry.get("weight_bytes", 0)),
            "state_dtypes": sorted(set(sess.state_dtypes()[k].name for k in sess.state_breakdown)),
        }
        if p == REFERENCE:
            top = ref_top_a
            row.update({"teacher_forced": {"max_abs_err": 0.0, "mean_abs_err": 0.0, "top1_agreement": 1.0},
                        "free_running": {"end_abs_err": 0.0, "end_cosine": 1.0, "worst_abs_err": 0.0,
                                         "worst_frame": 0, "min_cosine": 1.0, "mean_abs_err": 0.0,
                                         **drift_trend(np.zeros(n), np.zeros(n)),  # 1.0, or NaN for < 8 frames
                                         "first_nonfinite": None},
                        "top1_agreement": 1.0})
        else:
            r = rec[p]
            fe, fc, te = np.asarray(r.free_err), np.asarray(r.free_cos), np.asarray(r.tf_err)
            top = np.asarray(r.free_top)
            worst = int(fe.argmax())
            row.update({
                "teacher_forced": {"max_abs_err": float(te.max()), "mean_abs_err": float(te.mean()),
                                   "top1_agreement": float((np.asarray(r.tf_top) == ref_top_a).mean())},
                "free_running": {"end_abs_err": float(fe[-1]), "end_cosine": float(fc[-1]),
                                 "worst_abs_err": float(fe[worst]), "worst_frame": worst,
                                 "min_cosine": float(fc.min()), "mean_abs_err": float(fe.mean()),
                                 **drift_trend(fe, te), "first_nonfinite": r.nonfinite},
                "top1_agreement": float((top == ref_top_a).mean()),
            })
        if has_labels:
            known = lab >= 0
            row["accuracy"] = float((top[known] == lab[known]).mean())
        if clip_ends:
            row["clip_accuracy"] = float((top[clip_ends] == lab[clip_ends]).mean())
        rows[p] = row
    return {"artifact": manifest["_folder"], "model": manifest.get("name"), "source": description,
            "threads": threads,
            "frames": n, "streams": len(boundaries), "stream_starts": boundaries, "reference": REFERENCE,
            "output_scale": out_scale, "labelled": has_labels, "clips_scored": len(clip_ends),
            # a map's top-1 agreement counts positions (pixels), a vector's counts frames
            "agreement_per": "position" if output_map(manifest) is not None else "frame", "profiles": rows}


def _save_polygraphy(out: Path, manifest: dict[str, Any], names: list[str], recorded: list[dict[str, np.ndarray]],
                     free: dict[str, Session], dtypes: dict[str, dict[str, np.dtype]]) -> dict[str, str]:
    """One Polygraphy input file per profile: the same frames and FP32-rollout states, in its dtypes.

    Polygraphy's ``--load-inputs`` reads a JSON list of feed dicts written by
    ``polygraphy.json.save_json``; replay with
    ``polygraphy run model.<profile>.onnx --onnxrt --load-inputs polygraphy_inputs.<profile>.json``.
    """
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    files = {}
    for p in names:
        feeds = []
        for feed in recorded:
            if p == REFERENCE:
                feeds.append(dict(feed))
                continue
            states = {s["name"]: feed[s["input"]] for s in manifest["states"]}
            cast = cast_states(states, free[p].precision, dtypes[p])
            feeds.append({"frame": feed["frame"], **{state_io_names(k)[0]: v for k, v in cast.items()}})
        path = out / f"polygraphy_inputs.{p}.json"
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # no "[I] Saving ..." line per file
            save_json(feeds, str(path), description=f"edge3d step inputs ({p})")
        files[p] = path.name
    return files


def _plots(out: Path, report: dict[str, Any], rec: dict[str, _Recorder], latencies: dict[str, np.ndarray]) -> list[str]:
    """drift.png (error against frame index, both modes) and latency.png (histogram of step times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (p, r) in enumerate(rec.items()):
        color = f"C{i}"
        ax.plot(np.maximum(r.free_err, 1e-12), color=color, lw=0.8, label=f"{p} free-running")
        ax.plot(np.maximum(r.tf_err, 1e-12), color=color, lw=0.8, ls=":", alpha=0.8, label=f"{p} teacher-forced")
    for b in report["stream_starts"][1:]:
        ax.axvline(b, color="0.7", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("frame")
    ax.set_ylabel("max |output - fp32 output|")
    ax.set_title(f"drift against FP32: {report['model']} on {report['source']}")
    if rec:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, ms in latencies.items():
        if len(ms):
            ax.hist(ms, bins=50, alpha=0.5, label=p)
    ax.set_xlabel("ms per frame (a multi-rate model's: each cycle of its stages over its frames)"
                  if report.get("outputs", report["frames"]) != report["frames"] else "ms per frame")
    ax.set_ylabel("count")
    ax.set_title("step latency (ONNX Runtime)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return ["drift.png", "latency.png"]


METRICS = ["ms/frame p50", "ms/frame p95", "cache / stream", "weights", "TF err max", "TF err mean",
           "drift end err", "drift end cosine", "drift worst @ frame", "drift growth (vs TF)", "top-1 agreement",
           "accuracy", "accuracy per clip (last frame)", "NaN/Inf from frame"]
SCORED_ONLY = {"accuracy", "accuracy per clip (last frame)"}


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The comparison as rows of strings, one metric per row and one profile per column.

    Metrics down, profiles across: a handful of profiles fit an 80-column terminal, a dozen
    metrics across do not. Shared by the rich table and report.md.
    """
    largest = {k: max(r[k] for r in report["profiles"].values()) for k in ("cache_bytes", "weight_bytes")}
    cols = []
    for r in report["profiles"].values():
        tf, fr = r["teacher_forced"], r["free_running"]
        cols.append([
            f"{r['ms_p50']:.3f}", f"{r['ms_p95']:.3f}", format_bytes(r["cache_bytes"], largest["cache_bytes"]),
            format_bytes(r["weight_bytes"], largest["weight_bytes"]),
            f"{tf['max_abs_err']:.3g}", f"{tf['mean_abs_err']:.3g}", f"{fr['end_abs_err']:.3g}",
            f"{fr['end_cosine']:.5f}", f"{fr['worst_abs_err']:.3g} @ {fr['worst_frame']}",
            ("-" if np.isnan(fr["growth"]) else f"{fr['growth']:.2f} ({fr['growth_vs_step']:.2f})"),
            f"{100 * r['top1_agreement']:.2f}%",
            f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else "-",
            f"{100 * r['clip_accuracy']:.1f}% of {report['clips_scored']}" if "clip_accuracy" in r else "-",
            str(fr["first_nonfinite"]["frame"]) if fr.get("first_nonfinite") else "-",
        ])
    names = [f"{m} (per position)" if m == "top-1 agreement" and report.get("agreement_per") == "position" else m
             for m in METRICS]
    rows = [[m, *[c[i] for c in cols]] for i, m in enumerate(names)]
    # accuracy needs a labelled source, per-clip accuracy a folder of clips: a row of dashes says nothing
    return [r for r in rows if r[0] not in SCORED_ONLY or any(v != "-" for v in r[1:])]


def outputs_text(report: dict[str, Any]) -> str:
    """How many of the frames gave an output to compare, where not all did (a multi-rate model's)."""
    outputs = report.get("outputs", report["frames"])
    return "" if outputs == report["frames"] else (f", {outputs} of them with an output (the slowest stage's runs), "
                                                   "ms/frame over whole cycles of the stages")


def threads_text(report: dict[str, Any]) -> str:
    """What the ms/frame were measured with: compare's default is one ONNX Runtime thread per session,
    so that its 2N+1 sessions in lockstep do not contend, and d-resnet18's FP32 step read 14.2 ms here
    where `edge3d bench`, one session with both cores, read 6.8."""
    n = report.get("threads")
    return "" if n is None else (f"; ms/frame with {n} ONNX Runtime thread{'s' if n != 1 else ''} per session "
                                 "(--threads; `edge3d bench` times one session alone)")


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# edge3d compare: {report['model']}", "",
             f"Source: `{report['source']}`, {report['frames']} frames in {report['streams']} stream(s)"
             f"{outputs_text(report)}"
             f"{' (interrupted: the frames every profile finished)' if report.get('interrupted') else ''}; "
             f"reference {report['reference']}; output scale (max |fp32 output|) {report['output_scale']:.4g}.", "",
             *([f"Host: {host_line(report['host'])}; compare ms/frame only with reports from the same host"
                 f"{threads_text(report)}.", ""]
               if report.get("host") else []),
             "TF = teacher-forced per-step error (each profile fed the FP32 states); drift = free-running "
             "(each profile carries its own state), max abs error and cosine similarity against FP32; "
             "growth = mean drift of the last quarter over the third quarter (about 1 when bounded), in "
             "brackets the same divided by the teacher-forced growth (content divided out).", "",
             "| metric | " + " | ".join(report["profiles"]) + " |", "|---|" + "---:|" * len(report["profiles"])]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    notes = report_notes(report)
    if notes:
        lines += ["", *notes]
    if report.get("plots"):
        lines += [""] + [f"![{p}]({p})" for p in report["plots"]]
    if report.get("polygraphy_inputs"):
        lines += ["", "Replay the recorded step inputs with Polygraphy:", ""]
        lines += [f"    polygraphy run model.{p}.onnx --onnxrt --load-inputs {f}"
                  for p, f in report["polygraphy_inputs"].items()]
    return "\n".join(lines) + "\n"
