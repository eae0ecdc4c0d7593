"""Add precisions (FP16, INT8, int8-lowmem, user profiles) to an exported artifact.

Each precision is a graph of its own (``model.<profile>.onnx``) because TensorRT 10+ builds
strongly typed engines only: the casts and Q/DQ nodes must be in the ONNX. Every file gets the
manifest in its ``metadata_props`` and an entry in ``manifest["precisions"]`` with its state
dtypes, weight bytes, hash and, for INT8, how it was calibrated, so a comparison months later
can tell exactly what ran.

A multi-rate artifact has a graph per stage (``stage<k>.<profile>.onnx``), and each precision is
built stage by stage: each stage graph sees only its own states, its INT8 ranges come from the
feeds that stage really gets in an FP32 rollout, and the buffers between stages (one stage's
``feed.X`` output, the next one's ``buffer.X`` input) are stored in the profile's state dtype: float16
in FP16, int8 in int8-lowmem (with the scale of the values the reading stage was calibrated on).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx

from ..profiles import Profile, load_profile
from ..profiles import resolve_profiles as _resolve
from ..runtime.manifest import (
    BUFFER_IN,
    FEED_OUT,
    buffer_of_feed,
    format_version_for,
    is_positive_int,
    load_manifest,
    output_period,
    resolve_artifact,
    staging_folder,
)
from .onnx import embed_manifest, file_sha256, weight_bytes, write_manifest

_DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}

__all__ = ["add_precisions", "load_profile", "resolve_profiles"]


def resolve_profiles(names: str | list[str] | tuple[str, ...]) -> list[Profile]:
    """Load every profile named (built-in name or TOML path); ValueError on the first bad one.

    A string is one name or a comma-separated list, as on the command line."""
    return _resolve(names)


def graph_io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    """Element type names of every graph input and output (what the runtime will allocate)."""
    return {v.name: _DTYPE_NAMES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
            for v in list(model.graph.input) + list(model.graph.output)}


def _embed_manifest(model: onnx.ModelProto, manifest: dict[str, Any], entry: dict[str, Any],
                    stage: int | None = None) -> None:
    """Store the manifest (with this precision's entry) in ``metadata_props``, as the FP32 file does."""
    inner = {k: v for k, v in manifest.items() if k not in ("precisions", "engines") and not k.startswith("_")}
    inner["precision"] = {k: v for k, v in entry.items() if k != "sha256"}
    if stage is not None:
        inner["stage"] = stage
    embed_manifest(model, inner)


def _graphs(manifest: dict[str, Any]) -> list[tuple[int | None, Path, dict[str, Any]]]:
    """(stage, FP32 graph, the manifest as that graph sees it) per graph: one, with stage None, for a
    single-rate artifact; one per stage for a multi-rate one, each seeing only its own states and the
    manifest's ``buffers``, which its inputs from the stage before and its outputs to the next one are."""
    folder = Path(manifest["_folder"])
    fp32 = manifest["precisions"]["fp32"]
    if "stages" not in manifest:
        return [(None, folder / fp32["file"], manifest)]
    return [(st["index"], folder / file, {**manifest, "states": [s for s in manifest["states"]
                                                                 if s["name"] in st["states"]]})
            for st, file in zip(manifest["stages"], fp32["files"], strict=True)]


def _file_name(p: Profile, stage: int | None) -> str:
    return p.file_name if stage is None else f"stage{stage}.{p.name}.onnx"


def calib_frame_count(p: Profile, calib_frames: int | None) -> int:
    """The frames INT8 calibration steps past warm-up: --calib-frames, else the profile's."""
    return int(calib_frames) if calib_frames else p.calibration.frames


def _quantise(folder: Path, graphs: list[tuple[int | None, Path, dict[str, Any]]], p: Profile, tmp: Path, n: int,
              calib_source: Any, calib_frames: int | None, images_fps: float | None,
              console: Any) -> tuple[list[Path], list[Any]]:
    """The QDQ graph of every stage graph, each calibrated on FP32 rollouts; and their readers."""
    from .calibration import RolloutReader, default_calib_source
    from .int8 import quantize_qdq

    source = calib_source if calib_source is not None else default_calib_source()
    frames = calib_frame_count(p, calib_frames)
    stages = "" if len(graphs) == 1 else f", {len(graphs)} stages"
    progress, advance = _progress(console, frames * len(graphs),
                                  f"calibrating {p.name} ({p.calibration.method}{stages})")
    qdqs, readers = [], []
    try:
        if progress is not None:
            progress.start()
        for stage, fp32_path, view in graphs:
            reader = RolloutReader(folder, source, frames, p.calibration.warmup, advance, stage=stage,
                                   images_fps=images_fps)
            qdq = tmp / f"qdq.{n}.{len(qdqs)}.onnx"
            try:
                quantize_qdq(fp32_path, qdq, view, p, reader)
            finally:
                reader.close()
            qdqs.append(qdq)
            readers.append(reader)
    finally:
        if progress is not None:
            progress.stop()
    return qdqs, readers


def _progress(console: Any, total: int, label: str):
    """A rich progress bar over calibration frames (a no-op without a console)."""
    if console is None:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task(label, total=total)
    return progress, (lambda n: progress.advance(task, n))


def _calib_key(p: Profile) -> str:
    d = p.to_dict()
    for k in ("name", "description", "state_dtype", "backends"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def check_calib_frames(calib_frames: int | None) -> None:
    """Its own function so that `edge3d export` checks it before writing the FP32 artifact."""
    if calib_frames is not None and not is_positive_int(calib_frames):
        raise ValueError(f"--calib-frames must be an integer of at least 1, got {calib_frames!r}.")


def check_calib_covers_stages(name: str, period: int, profiles: list[Profile], calib_frames: int | None) -> None:
    """Refuse INT8 calibration too short for a multi-rate model's slowest stage, before any work.

    Stage k is calibrated on the feeds it gets in the FP32 rollout, one every ``rate_k`` frames, so
    fewer frames than the slowest stage's rate left it none, and the reader said the source "gave no
    frames", which synthetic never does.
    """
    for p in profiles:
        frames = calib_frame_count(p, calib_frames)
        if p.kind == "int8" and frames < period:
            what = f"--calib-frames {frames}" if calib_frames else f"profile {p.name}'s calibration frame count ({frames})"
            raise ValueError(f"{what} is less than {name}'s output period ({period} frames): its slowest stage runs "
                             f"once every {period} frames and would get no calibration feed; pass --calib-frames "
                             f"{period} or more (a stage that runs every r frames gets one feed per r frames).")


MIN_QUANTISER_ORT = (1, 19)


def check_quantiser() -> None:
    """Refuse INT8 before any work where onnxruntime's quantiser cannot run.

    The runtime loads artifacts on onnxruntime 1.17 and up, but quantising needs 1.19: the quantiser
    of 1.17 and 1.18 calls ``onnx.mapping``, which current onnx no longer has (measured with onnx 1.23),
    and fails deep inside with an AttributeError.
    """
    import onnxruntime as ort

    version = tuple(int(x) for x in re.findall(r"\d+", ort.__version__)[:2])
    if version < MIN_QUANTISER_ORT:
        need = ".".join(map(str, MIN_QUANTISER_ORT))
        raise ValueError(
            f"INT8 precisions are quantised with onnxruntime's quantiser, which needs onnxruntime {need} or newer "
            f"(this is {ort.__version__}); upgrade it with `pip install --upgrade onnxruntime` on the machine "
            "that exports. Artifacts made there still run on onnxruntime 1.17."
        )


def _check_loads(path: Path, profile: str) -> None:
    """Load the graph just built in this machine's onnxruntime, before it replaces anything.

    onnx's checker passes graphs that an onnxruntime version's optimiser then refuses (1.30 refused
    an earlier int8-lowmem form); found here, the artifact keeps its files and the user is told what
    to report, instead of an export that succeeds and a `run` that calls the new file corrupt.
    """
    import onnxruntime as ort

    from ..runtime.backend.onnxrt import _load_session, ort_reason
    from ..runtime.manifest import ArtifactError

    try:
        _load_session(path, 1)
    except ArtifactError as e:
        reason = ort_reason(e.__cause__ or e)
        raise ValueError(
            f"onnxruntime {ort.__version__} cannot load the {profile} graph edge3d just built ({reason}); the artifact "
            "is unchanged. This is an edge3d bug with this onnxruntime version: please report it with the output of "
            "`edge3d --version`, and meanwhile export this precision with another onnxruntime version."
        ) from e


def add_precisions(
    path: str | Path,
    names: str | list[str] | tuple[str, ...],
    *,
    calib_source: str | Iterable[Any] | None = None,
    calib_frames: int | None = None,
    console: Any = None,
    calib_images_fps: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Build the named precisions into the artifact at ``path``; return their manifest entries.

    ``calib_source`` (INT8 only): a video file, a folder of videos (one stream each),
    ``synthetic[:SEED]``, or an iterable of frames; default synthetic where installed.
    ``calib_frames`` overrides the profile's number of calibration frames; ``calib_images_fps`` is
    the rate the source's folders of images were extracted at, paced to the artifact's frame rate as
    videos are (`edge3d export --calib-images-fps`). Each file is
    written under a temporary name and moved into place, and the manifest is rewritten
    atomically after each precision, so an interrupted build never leaves a broken artifact.
    """
    from .calibration import CALIB_SOURCE
    from .fp16 import convert_fp16
    from .int8 import store_states_int8

    folder = resolve_artifact(path)
    manifest = load_manifest(folder)
    profiles = resolve_profiles(names)
    check_calib_frames(calib_frames)
    from ..runtime.rate import check_images_fps

    calib_images_fps = check_images_fps(calib_images_fps, manifest, folder, "--calib-images-fps")
    if any(p.kind == "int8" for p in profiles):
        check_quantiser()
    if "stages" in manifest:
        check_calib_covers_stages(manifest["name"], output_period(manifest), profiles, calib_frames)
    graphs = _graphs(manifest)
    entries: dict[str, dict[str, Any]] = {}
    tmp = staging_folder(folder, ".precision.")
    qdq_cache: dict[str, tuple[list[Path], list[Any]]] = {}
    try:
        for p in profiles:
            if p.name == "fp32":
                continue
            entry: dict[str, Any] = {"file": _file_name(p, graphs[0][0]), "profile": p.name, "spec": p.to_dict()}
            if p.kind == "fp16" and console is not None:
                console.print(f"converting to {p.name} (float16, accumulators float32)...")
            if p.kind == "int8":
                key = _calib_key(p)
                if key not in qdq_cache:
                    qdq_cache[key] = _quantise(folder, graphs, p, tmp, len(qdq_cache), calib_source,
                                               calib_frames, calib_images_fps, console)
                qdqs, readers = qdq_cache[key]
                entry["calibration"] = {"method": p.calibration.method, **readers[0].info()}
                if graphs[0][0] is not None:  # the feeds each stage was calibrated on, a count per stage
                    entry["calibration"].update(feeds=[r.feeds for r in readers],
                                                nonzero_state_feeds=[r.nonzero_state_feeds for r in readers])
            outs, dtypes, quant = [], {}, {}
            for k, (stage, fp32_path, view) in enumerate(graphs):
                if p.kind == "fp32":
                    model = onnx.load(str(fp32_path))
                elif p.kind == "fp16":
                    model = convert_fp16(onnx.load(str(fp32_path)), view, p)
                else:
                    model = onnx.load(str(qdqs[k]))
                    if p.state_dtype == "int8":
                        # a buffer between stages is written by one stage graph and read by the next, with
                        # the scale of the values the reading stage was calibrated on
                        ranges = {n: r.state_range(n, p.calibration.method, p.calibration.percentile)
                                  for r in readers for n in r.buffer_names}
                        ranges.update({n: readers[k].state_range(n, p.calibration.method, p.calibration.percentile)
                                       for n in readers[k].state_names})
                        ends = [(i.name, i.name, None) for i in model.graph.input if i.name.startswith(BUFFER_IN)]
                        ends += [(buffer_of_feed(o.name), None, o.name) for o in model.graph.output
                                 if o.name.startswith(FEED_OUT)]
                        model, q = store_states_int8(model, view, ranges, "int8", ends)
                        quant.update(q)
                io = graph_io_dtypes(model)
                dtypes.update({s["name"]: io[s["input"]] for s in view["states"]})
                dtypes.update({n: d for n, d in io.items() if n.startswith(BUFFER_IN)})
                if k == 0:
                    entry["io_dtypes"] = {"frame": io["frame"]}
                if k == len(graphs) - 1:
                    entry["io_dtypes"]["output"] = io["output"]
                outs.append((stage, model))
            entry["state_dtypes"] = {s["name"]: dtypes[s["name"]] for s in manifest["states"]}
            if graphs[0][0] is not None:  # the buffers between stages, as the stage graphs that read them take them
                entry["buffer_dtypes"] = {b["name"]: dtypes[b["name"]] for b in manifest.get("buffers", [])}
            if quant:
                entry["state_quant"] = quant
            if graphs[0][0] is not None:
                entry["files"] = [_file_name(p, stage) for stage, _ in outs]
            # 4 for a multi-rate artifact's stage graphs of this precision, in the files and in manifest.json
            manifest["format_version"] = format_version_for(
                manifest["frame"], {**manifest, "precisions": {**manifest["precisions"], p.name: entry}})
            written = []
            for stage, model in outs:
                out = tmp / _file_name(p, stage)
                _embed_manifest(model, manifest, entry, stage)
                onnx.save(model, str(out))
                onnx.checker.check_model(str(out))
                _check_loads(out, p.name)
                written.append(out)
            entry["weight_bytes"] = sum(weight_bytes(out) for out in written)
            hashes = [file_sha256(out) for out in written]
            entry["sha256"] = hashes if graphs[0][0] is not None else hashes[0]
            for out in written:
                os.replace(out, folder / out.name)
            manifest["precisions"][p.name] = entry
            # An engine built from the ONNX just replaced would run the old graph: recorded by
            # `edge3d build`, or under the default name that build_engines.sh writes.
            recorded = manifest.get("engines", {}).pop(p.name, None)
            write_manifest(folder, manifest)
            entries[p.name] = entry
            for stale in {folder / f"model.{p.name}.engine", *([folder / recorded["file"]] if recorded else [])}:
                if stale.is_file():
                    stale.unlink()
                    if console is not None:
                        console.print(f"removed {stale.name}, built from the previous {p.file_name}; rebuild it "
                                      f"on the device with `edge3d build {shlex.quote(str(folder))} --profile {p.name}`")
            if console is not None:
                cal = entry.get("calibration")
                how = f", calibrated on {cal['frames']} frames of {cal['source']}" if cal else ""
                console.print(f"wrote [bold]{folder / entry['file']}[/]"
                              f"{' and the other stages' if 'files' in entry else ''} ({p.name}{how})")
                if cal and cal["frames"] < cal["frames_requested"]:  # ranges from a few frames clip the rest
                    console.print(f"[bold yellow]warning:[/] {cal['source']} ran out after {cal['frames']} of the "
                                  f"{cal['frames_requested']} calibration frames asked for (each stream's first "
                                  f"{cal['warmup']} are warm-up); ranges seen on so few frames may clip others, so "
                                  f"pass a longer {CALIB_SOURCE}, or several clips in a folder.", highlight=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entries
