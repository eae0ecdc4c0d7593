"""Step module -> self-describing ONNX artifact (``<name>.edge3d/``).

The graph is exported with PyTorch's default (torch.export-based) exporter with a dynamic
stream axis, simplified by ONNX Runtime's basic, op-preserving graph optimisations (constant
folding, BatchNorm folded into the preceding Conv) and checked with ``onnx.checker``. The
manifest goes both to ``manifest.json`` and into the ONNX ``metadata_props``, so a bare
``.onnx`` still says what its states are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..accounting import count_macs, dtype_name
from ..convert import StepModule, modes_kept, to_step, unwrap
from ..runtime.manifest import (
    MANIFEST,
    METADATA_KEY,
    NAME,
    class_count,
    file_sha256,
    format_version_for,
    staging_folder,
    state_io_names,
)
from ..runtime.manifest import write_manifest as write_manifest  # lives in the torch-free runtime
from ..runtime.preprocess import check_color, check_fit, check_normalisation
from ..runtime.rate import check_fps

OPSET = 18
DEFAULT_MEAN = (0.45, 0.45, 0.45)
DEFAULT_STD = (0.225, 0.225, 0.225)


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a model without its own ``frame_mean``/``frame_std`` gets: the video
    datasets' 0.45 / 0.225 for every channel, so a grey or thermal model (1 channel) has its one."""
    return (DEFAULT_MEAN[0],) * channels, (DEFAULT_STD[0],) * channels


def colour_of(channels: int, order: str = "RGB") -> tuple[str, str]:
    """The manifest's ``color`` and ``raw_input`` for frames of this many channels (``order``: a
    three-channel model's, RGB or BGR)."""
    if channels == 3:
        return order, "HxWx3 uint8" if order == "RGB" else "HxWx3 uint8 RGB (reversed to BGR for the model)"
    if channels == 1:
        return "gray", "HxW uint8 (an HxWx3 RGB frame is converted to grey)"
    return f"{channels} channels", f"HxWx{channels} uint8"


def source_hash(model: nn.Module) -> str:
    """Hash of the weights and buffers, so an artifact can tell which model it came from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.onnx/torch.export logging and warnings: users should see our progress, not theirs."""
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quiet_export(step: StepModule, path: Path, opset: int) -> None:
    """Trace the step with its stream axis dynamic, and refuse a graph that fixed it.

    The example inputs hold two streams: torch.export specialises a dimension whose example size is
    1, so forward code that folds the batch with another axis (``reshape(n * t, ...)`` ahead of an
    attention layer) made its export fail the dynamic-shape constraint, and torch.onnx's fallback
    then wrote a graph that takes one stream only; with two, the same code exports dynamic.
    """
    specs = step.state_specs
    frame = torch.zeros(2, *step.frame_shape)
    states = step.initial_states(2)
    inputs = ["frame"] + [state_io_names(s.name)[0] for s in specs]
    outputs = ["output"] + [state_io_names(s.name)[1] for s in specs]
    batch = torch.export.Dim("streams", min=1, max=4096)
    # forward(frame, *states): torch.export counts an empty *states as no input at all, so a model
    # without temporal layers (a per-frame baseline) must not get an entry for it
    dynamic = ({0: batch}, tuple({0: batch} for _ in specs)) if specs else ({0: batch},)
    with quiet():
        torch.onnx.export(step, (frame, *states), str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
                          external_data=False)
    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = [i.name for i in graph.input if i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if fixed:
        raise ValueError(f"the exported step graph takes a fixed number of streams ({', '.join(fixed[:3])} "
                         "has a fixed first axis): the model's forward code ties the batch size to a constant "
                         "(an int() of a shape, a view with a literal batch size, a Python branch on the "
                         "batch size); write it for any batch size (x.shape[0], reshape(-1, ...)), as the "
                         "runtime batches streams on that axis.")


def drop_raw(raw: Path) -> None:
    """Delete the exporter's graph and the weights file it may have put beside it.

    Near the 2 GiB limit the PyTorch exporter writes the weights to ``<file>.data`` although
    asked for one file (seen with 1.8 GiB of weights); left in place, that copy doubled the
    artifact's size.
    """
    raw.unlink()
    raw.with_name(raw.name + ".data").unlink(missing_ok=True)


def simplify(src: Path, dst: Path) -> None:
    """Constant folding and Conv+BatchNorm folding with ONNX Runtime's basic (op-preserving) level,
    then the BatchNorms after sums of convs (exporters/fold.py)."""
    import onnxruntime as ort

    from .fold import fold_bn_into_conv_sums
    from .graph import SCOPES_KEY, share_identical_initializers

    raw = onnx.load(str(src), load_external_data=False)  # external weights stay where they are
    if raw.ir_version > oldest_ir_version(raw):  # so an older onnxruntime (1.17) can load it here too
        raw.ir_version = oldest_ir_version(raw)
        onnx.save(raw, str(src))
    del raw
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(dst))
    # ORT drops node metadata; carry the exporter's (module name scopes) over by node name, so
    # precision profiles can keep named layers in float32.
    meta = {n.name: [m for m in n.metadata_props if m.key == SCOPES_KEY]
            for n in onnx.load(str(src), load_external_data=False).graph.node}
    for n in model.graph.node:
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])
    fold_bn_into_conv_sums(model)  # a BN after a sum of convs, which ORT leaves alone
    share_identical_initializers(model.graph)  # one copy of a layer's weights however often it runs
    # Folding leaves value_info behind for tensors no node produces any more (e.g. the 5-D
    # weights before they were reshaped to 2-D kernels); drop them so the graph says only true things.
    produced = {o for n in model.graph.node for o in n.output}
    live = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(live)
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.save(model, str(dst))


def embed_manifest(model: onnx.ModelProto, manifest: dict[str, Any]) -> None:
    """Store the manifest in ``metadata_props`` so a bare .onnx still describes its states.

    Every graph of an artifact passes through here before its last save, so this is also where
    its IR version is set to the oldest one its opsets allow (8 for opset 18): the exporter
    stamps the newest its onnx package knows (10 with onnx 1.23), which ONNX Runtime 1.17
    refuses to load ("max supported IR version: 9"), although nothing in the graph needs it.
    Artifacts are made on a workstation and run on devices (JetPack) whose onnxruntime is often
    older.
    """
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest, sort_keys=True)
    model.producer_name, model.producer_version = "edge3d", __version__
    model.ir_version = oldest_ir_version(model)


def oldest_ir_version(model: onnx.ModelProto) -> int:
    """The oldest ONNX IR version the model's opsets allow (8 for opset 18); see ``embed_manifest``."""
    return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def set_metadata(path: Path, manifest: dict[str, Any]) -> None:
    model = onnx.load(str(path))
    embed_manifest(model, manifest)
    onnx.save(model, str(path))


def set_class_names(folder: str | Path, classes: list[str] | str | os.PathLike) -> list[str]:
    """Name (or rename) an exported artifact's classes in place, without exporting it again.

    A Triton repository written before keeps the old names.
    """
    from ..labels import read_labels
    from ..runtime.manifest import load_manifest

    names = read_labels(classes) if isinstance(classes, (str, os.PathLike)) else classes
    names = check_classes(names, tuple(load_manifest(folder)["output"]["shape"][1:]))

    def edit(manifest: dict[str, Any]) -> None:
        manifest.setdefault("output", {})["classes"] = names

    rewrite_manifests(folder, edit, "labels")
    return names


def set_frame(folder: str | Path, *, fit: str | None = None, color: str | None = None,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
              fps: float | str | None = None) -> dict[str, Any]:
    """Set, in place, how an exported artifact's runtime turns a camera frame into the model's input:
    the fit to the model's size ("stretch" or "crop"), a three-channel model's channel order ("RGB" or
    "BGR"), the normalisation's per-channel mean and std (one value stands for every channel), and the
    frame rate the model takes (``fps``: a number, or "source" for every frame the source gives). How
    the model was trained decides them, not the graph, so no export is needed. A Triton repository
    written before keeps the old ones; an INT8 precision calibrated on frames prepared the old way
    is named in a warning. Returns the new frame spec."""
    from ..runtime.manifest import load_manifest

    before = load_manifest(folder)
    old = before["frame"]
    channels = int(old["channels"])
    fit = None if fit is None else check_fit(fit)
    color = None if color is None else check_color(color, channels)
    # one value for every channel, as `--mean 0.5` gives; anything else is checked as it is
    mean, std = (tuple(x) * channels if isinstance(x, (list, tuple)) and len(x) == 1 else x for x in (mean, std))
    check_normalisation(old.get("mean", [0.0] * channels) if mean is None else mean,
                        old.get("std", [1.0] * channels) if std is None else std, channels)
    changes: dict[str, Any] = {k: v for k, v in (("fit", fit), ("mean", mean), ("std", std)) if v is not None}
    if fps is not None:
        changes["fps"] = check_fps(fps)  # None for "source"
    changes.update({k: [float(v) for v in changes[k]] for k in ("mean", "std") if k in changes})
    if color is not None:
        changes["color"], changes["raw_input"] = colour_of(channels, color)

    def edit(manifest: dict[str, Any]) -> None:
        frame = manifest.setdefault("frame", {})
        frame.update(changes)
        manifest["format_version"] = format_version_for(frame, manifest)

    differs = any(old.get(k, "stretch" if k == "fit" else None) != v for k, v in changes.items())
    rewrite_manifests(folder, edit, "frame")  # the precisions stay as they were
    calibrated = [name for name, p in before["precisions"].items() if "calibration" in p]
    if calibrated and differs:
        # INT8 scales were chosen from activations of frames prepared the old way: a changed order or
        # normalisation moves every first-layer range, a crop the content the ranges were taken over
        warnings.warn(f"{', '.join(calibrated)} {'was' if len(calibrated) == 1 else 'were'} calibrated on frames "
                      "prepared the old way; calibrate again with `edge3d export "
                      f"{shlex.quote(before['_folder'])} --profile {','.join(calibrated)}`.", stacklevel=2)
    return {**old, **changes}


def rewrite_manifests(folder: str | Path, edit: Callable[[dict[str, Any]], None], tag: str) -> None:
    """Apply ``edit`` to ``manifest.json`` and to the manifest embedded in every graph file.

    Every precision's graphs (every stage of a multi-rate one) are rewritten and rehashed: a graph
    whose manifest disagreed with the folder's would describe itself otherwise once copied out of it.
    Every file is written beside its target first and moved into place after all were written.
    TensorRT engines hold no manifest and are kept.
    """
    from ..runtime.manifest import load_manifest

    manifest = load_manifest(folder)
    path = Path(manifest.pop("_folder"))
    moves: list[tuple[Path, Path]] = []
    try:
        for entry in manifest["precisions"].values():
            files = entry.get("files") or [entry["file"]]
            digests = []
            for name in files:
                model = onnx.load(str(path / name))
                for prop in model.metadata_props:
                    if prop.key == METADATA_KEY:
                        inner = json.loads(prop.value)
                        edit(inner)
                        prop.value = json.dumps(inner, sort_keys=True)
                tmp = path / f".{name}.{tag}"
                moves.append((tmp, path / name))
                onnx.save(model, str(tmp))
                digests.append(file_sha256(tmp))
            entry["sha256"] = digests if "files" in entry else digests[0]
    except BaseException:
        for tmp, _ in moves:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, dst in moves:
        os.replace(tmp, dst)
    edit(manifest)
    write_manifest(path, manifest)


def weight_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return int(sum(np.prod(t.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                   for t in model.graph.initializer))


LABEL_SUFFIXES = {".txt", ".csv", ".json", ".names", ".labels"}  # a string ending so is a label file's path


class ClassCountError(ValueError):
    """Class names whose count is not the model's: ``edge3d export --labels`` names the file with both counts."""

    def __init__(self, given: int, outputs: int) -> None:
        super().__init__(f"{given} class names for a model with {outputs} classes; pass one name per class (per "
                         "output channel of a map), in output order (or none).")
        self.given, self.outputs = given, outputs


def check_classes(classes: list[str] | None, output_shape: tuple[int, ...]) -> list[str] | None:
    """The class names as a list, refused unless they are strings, one per class (per channel of a map)."""
    if classes is None:
        return None
    outputs = class_count(output_shape)
    if isinstance(classes, str) or not all(isinstance(n, str) for n in classes):
        raise ValueError(f"classes must be a list of class names (strings), got {classes!r:.80}.")
    if len(classes) != outputs:
        raise ClassCountError(len(classes), outputs)
    return list(classes)


def step_output_shape(step: StepModule) -> tuple[int, ...]:
    """One stream's output per frame, from one step of zeros (the last stage's, for a multi-rate step)."""
    with torch.no_grad():
        if hasattr(step, "stages"):
            last = step.stages[-1]
            out = last(*last.example_inputs(1), *last.initial_states(1))[0]
        else:
            out = step(torch.zeros(1, *step.frame_shape), *step.initial_states(1))[0]
    return tuple(out.shape[1:])


def manifest_header(model: nn.Module, frame_shape: tuple[int, ...], name: str, *, model_info: dict[str, Any],
                    classes: list[str] | None, mean: tuple[float, ...], std: tuple[float, ...],
                    output_shape: tuple[int, ...], fit: str = "stretch", color: str = "RGB",
                    fps: float | None = None) -> dict[str, Any]:
    """The manifest fields every artifact has, single- or multi-rate: version, source, frame, output."""
    c, h, w = frame_shape
    classes = check_classes(classes, output_shape)
    colour, raw_input = colour_of(c, color)
    frame = {"name": "frame", "layout": "NCHW", "channels": c, "height": h, "width": w,
             "dtype": "float32", "color": colour, "raw_input": raw_input,
             "fit": check_fit(fit), "fps": check_fps(fps),
             "normalization": "(pixel / 255 - mean) / std", "mean": [float(v) for v in mean],
             "std": [float(v) for v in std]}
    return {
        "format_version": format_version_for(frame),
        "edge3d_version": __version__,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**model_info, "source_hash": source_hash(model),
                  "params": sum(p.numel() for p in model.parameters())},
        "frame": frame,
        "output": {"name": "output", "shape": ["N", *output_shape], "dtype": "float32",
                   "kind": "logits", "classes": classes},
        "precisions": {},
        "engines": {},
    }


def build_manifest(step: StepModule, name: str, *, model_info: dict[str, Any], classes: list[str] | None,
                   mean: tuple[float, ...], std: tuple[float, ...], lowered: bool, fit: str = "stretch",
                   color: str = "RGB", fps: float | None = None) -> dict[str, Any]:
    states = []
    for s in step.state_specs:
        i, o = state_io_names(s.name)
        states.append({"name": s.name, "input": i, "output": o, "shape": ["N", *s.shape],
                       "dtype": dtype_name(s.dtype), "init": s.init, "kind": s.kind, "layer": s.layer,
                       "bytes": s.bytes, "input_history": s.input_history})
    return {
        **manifest_header(step.model, step.frame_shape, name, model_info=model_info, classes=classes,
                          mean=mean, std=std, output_shape=step_output_shape(step), fit=fit, color=color,
                          fps=fps),
        "states": states,
        "macs_per_frame": count_macs(step),
        "params": sum(p.numel() for p in step.model.parameters()),
        "state_bytes": sum(s["bytes"] for s in states if not s["input_history"]),
        "input_history_bytes": sum(s["bytes"] for s in states if s["input_history"]),
        "lowered": lowered,
    }


def frame_hw(frame_size: Any) -> tuple[int, int]:
    """``frame_size`` as (height, width): an int for a square frame, or a pair."""
    if isinstance(frame_size, numbers.Integral) and not isinstance(frame_size, bool):
        return int(frame_size), int(frame_size)
    if (isinstance(frame_size, (tuple, list)) and len(frame_size) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in frame_size)):
        return int(frame_size[0]), int(frame_size[1])
    raise ValueError(f"frame_size must be an int (a square frame) or a (height, width) pair of ints, got "
                     f"{frame_size!r}.")


def check_artifact_name(name: str) -> None:
    """Fail before the export on a name that would write outside ``out_dir`` (``../x``) or that Triton
    could not serve, rather than with an OS error about a temporary folder."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"artifact name {name!r} is not a plain name; pass --name with letters, digits, '_', '-' "
                         "or '.', starting with a letter or digit.")


@contextlib.contextmanager
def artifact_folder(out_dir: Path, name: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Assemble ``out_dir/<name>.edge3d`` in a temporary folder and move it into place at the end.

    Yields (folder, manifest dict to fill). A failed export leaves neither a half-written
    artifact nor the temporary folder behind, and an existing artifact is replaced only on success.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{name}.edge3d"
    tmp = staging_folder(out_dir, f".{name}.")
    manifest: dict[str, Any] = {}
    try:
        yield tmp, manifest
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# protobuf refuses to serialise a message of 2 GiB or more, and each graph is written as one file
ONNX_FILE_LIMIT = 2**31


def check_fits_one_file(model: nn.Module, name: str) -> int:
    """Refuse before exporting a model whose weights one ONNX file cannot hold.

    Past the limit, the exporter ran for a minute and ONNX Runtime then failed to parse the
    file with a protobuf traceback; the weights' size says so up front.
    """
    from torch.nn.parameter import is_lazy  # a LazyLinear has no size until its first call

    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if not is_lazy(t))
    if weight_bytes >= ONNX_FILE_LIMIT:
        raise ValueError(f"{name} holds {weight_bytes / 2**30:.2f} GiB of weights, more than one ONNX file can hold "
                         "(protobuf caps a file below 2 GiB, and edge3d writes each graph as one file); export a "
                         "smaller variant (a smaller --width or --classes).")
    return weight_bytes


def check_disk_space(folder: Path, need: int, what: str) -> None:
    """Refuse before writing what the disk cannot hold. Past it, a full disk surfaced as ONNX
    Runtime's "Protobuf serialization failed" traceback, or a path-less "No space left on device"."""
    import shutil

    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ValueError(f"{existing} has {free / 1e6:.1f} MB free, and {what} needs about {need / 1e6:.1f} MB; "
                         "free space there or write to another disk.")


def export_artifact(
    model: nn.Module,
    out_dir: str | Path,
    name: str,
    *,
    frame_size: int | tuple[int, int] = 112,
    channels: int | None = None,
    lower: bool = True,
    model_info: dict[str, Any] | None = None,
    classes: list[str] | str | os.PathLike | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    fit: str | None = None,
    color: str | None = None,
    fps: float | str | None = None,
    opset: int = OPSET,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir/<name>.edge3d/`` with ``manifest.json`` and ``model.fp32.onnx``.

    The artifact is assembled in a temporary folder and moved into place at the end, so a
    failed export never leaves a half-written artifact behind. ``verify`` first streams a random
    clip through the step and compares it with the clip forward, then (single-graph artifacts)
    one through the written ONNX graph against the step (``edge3d/equivalence.py``): a model whose
    forward code mixes frames by itself, or a graph that does not compute its step, is refused
    before the artifact is moved into place; ``model.step_check`` in the manifest records what
    was checked (None when skipped). ``progress`` is told each phase as it starts: a full-size
    VoV3D takes over a minute, most of it in torch.export, and a status line that names the phase
    shows the user the export is moving.

    What is left out comes from the model, as ``edge3d export`` takes it: ``channels`` from its
    ``frame_channels`` attribute or first convolution, ``mean``/``std`` from ``frame_mean``/``frame_std``,
    ``classes`` from ``class_names``, ``fit`` from ``frame_fit`` (else "stretch"), ``color`` from
    ``frame_color`` (else "RGB"), ``fps`` from ``frame_fps`` (else None: every frame the source gives).
    A model trained with its own statistics, on centre crops (``fit="crop"``), on OpenCV's unconverted
    BGR frames (``color="BGR"``) or on every 5th frame of 30 fps video (``fps=6``) is then fed the
    frames it was trained on from Python too, not the defaults. ``classes`` may also be the path of a label file, in any layout
    ``edge3d export --labels`` reads (``edge3d/labels.py``).
    """
    from ..models import frame_channels

    say = progress or (lambda _phase: None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_artifact needs a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap(model)
    own = model.model if isinstance(model, StepModule) else model  # the user's module, for its attributes
    with modes_kept(own):  # the step switches it to eval mode; the caller may go on training it
        if channels is None:
            channels = model.frame_shape[0] if isinstance(model, StepModule) else frame_channels(model)
        mean = getattr(own, "frame_mean", None) if mean is None else mean
        std = getattr(own, "frame_std", None) if std is None else std
        fit = check_fit(getattr(own, "frame_fit", "stretch") if fit is None else fit)
        color = getattr(own, "frame_color", None) if color is None else color
        fps = check_fps(getattr(own, "frame_fps", None) if fps is None else fps)
        classes = getattr(own, "class_names", None) if classes is None else classes
        # a label file, as `edge3d export --labels` takes; a string that names no file and does not look like
        # a path ("abcde", one name, or names run together) is refused below as not a list of names
        if isinstance(classes, os.PathLike) or (isinstance(classes, str) and (
                os.path.isfile(classes) or os.sep in classes or Path(classes).suffix.lower() in LABEL_SUFFIXES)):
            from ..labels import read_labels

            classes = read_labels(classes)
        check_artifact_name(name)
        if Path(out_dir).exists() and not Path(out_dir).is_dir():  # mkdir said only "[Errno 17] File exists"
            raise ValueError(f"out_dir {out_dir} is a file, not a folder; pass the folder to write {name}.edge3d into.")
        if (Path(out_dir) / MANIFEST).is_file():
            raise ValueError(f"out_dir {out_dir} is an artifact folder; pass the folder to write {name}.edge3d into, "
                             f"such as {Path(out_dir).parent}.")
        final = Path(out_dir) / f"{name}.edge3d"
        if final.exists() and not (final / MANIFEST).is_file():  # replacing it would delete whatever it holds
            raise ValueError(f"{final} exists and is not an edge3d artifact, which export would replace; move it away, "
                             "or pass another output folder (-o) or --name.")
        weights = check_fits_one_file(model, name)
        # the exporter's graph and the simplified one sit side by side until the first is dropped
        check_disk_space(Path(out_dir), 2 * weights + 2**20, f"exporting {name} (its float32 weights twice)")
        default_mean, default_std = default_normalisation(channels)  # for each of the frame's channels
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
        check_normalisation(mean, std, channels)
        color = "RGB" if color is None and channels == 3 else color
        if color is not None:
            color = check_color(color, channels)
        h, w = frame_hw(frame_size)
        say("building the step")
        if lower:
            step = model if isinstance(model, StepModule) else to_step(model, (channels, h, w))
        else:
            step = to_step(model, (channels, h, w), keep_time=True, lower=False)
        # before the checks and the export, which take seconds: the names must fit the output
        classes = check_classes(classes, step_output_shape(step)) if classes is not None else None
        check = None
        if verify:
            from ..equivalence import check_step_matches_clip

            say("checking the step against the clip forward")
            check = check_step_matches_clip(step)
        model_info = {**(model_info or {"name": name}), "step_check": check}
        out_dir = Path(out_dir)
        if hasattr(step, "stages"):  # multi-rate: one graph per stage (exporters/staged.py)
            from .staged import export_staged

            return export_staged(step, out_dir, name, model_info=model_info, classes=classes,
                                 mean=mean, std=std, fit=fit, color=color or "RGB", fps=fps, opset=opset,
                                 progress=say)
        with artifact_folder(out_dir, name) as (tmp, manifest):
            raw = tmp / "raw.onnx"
            say("tracing the step graph (torch.export)")
            _quiet_export(step, raw, opset)
            onnx_path = tmp / "model.fp32.onnx"
            say("simplifying the graph")
            simplify(raw, onnx_path)
            drop_raw(raw)
            manifest.update(build_manifest(step, name, model_info=model_info, classes=classes,
                                           mean=mean, std=std, lowered=lower, fit=fit, color=color or "RGB",
                                           fps=fps))
            manifest["precisions"]["fp32"] = {
                "file": onnx_path.name, "profile": "fp32",
                "state_dtypes": {s["name"]: s["dtype"] for s in manifest["states"]},
            }
            set_metadata(onnx_path, {k: v for k, v in manifest.items() if k != "precisions"})
            onnx.checker.check_model(str(onnx_path), full_check=True)
            if check is not None:  # the graph as written, against the step it was made from
                from ..equivalence import check_onnx_matches_step

                say("checking the ONNX graph against the step in ONNX Runtime")
                manifest["model"]["step_check"]["onnx_max_error_relative"] = check_onnx_matches_step(onnx_path, step)
            manifest["precisions"]["fp32"]["weight_bytes"] = weight_bytes(onnx_path)
            manifest["precisions"]["fp32"]["sha256"] = file_sha256(onnx_path)
        return out_dir / f"{name}.edge3d"
