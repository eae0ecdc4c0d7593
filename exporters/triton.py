"""Artifact -> Triton model repository with implicit state (sequence batcher).

Our step graph is a pure function ``step(frame, states) -> (output, states')`` with the
stream axis first, which is exactly what Triton's *implicit state management* wants: Triton
keeps each sequence's (camera's) state tensors between requests, feeds them to the
``state_in.X`` inputs and stores the ``state_out.X`` outputs, so a client sends only frames.

One model is written for the ONNX graph of a precision (onnxruntime backend), and one per
TensorRT engine the manifest lists (``tensorrt_plan``). Each ``config.pbtxt`` is built as a
``ModelConfig`` protobuf and printed with ``text_format``, so it always parses; the graph's
own inputs and outputs (names, dtypes, dims) are the source of every entry, cross-checked
against the manifest, so config and model cannot disagree.

Needs ``onnx`` (export extra) and ``tritonclient`` (triton extra), imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..runtime.manifest import (
    NAME,
    ArtifactError,
    is_positive_int,
    load_manifest,
    output_map,
    precision_entry,
    require_single_graph,
    staging_folder,
    state_io_names,
)

# manifest / numpy dtype name -> Triton data type
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "float64": "TYPE_FP64",
                "uint64": "TYPE_UINT64"}
# Graph inputs named like this are sequence controls Triton fills in (our exported graphs have
# none: their state alone carries the past, and a new sequence starts from initial_state).
CONTROL_INPUTS = {"sequence_start": "CONTROL_SEQUENCE_START", "sequence_end": "CONTROL_SEQUENCE_END",
                  "sequence_ready": "CONTROL_SEQUENCE_READY", "sequence_id": "CONTROL_SEQUENCE_CORRID"}
KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
MANIFEST_COPY = "edge3d_manifest.json"
# The class names, one per line, for Triton's classification extension: a client asking for the
# output's top classes ("classification": 5) gets "score:index:name" strings instead of indices.
LABELS_FILE = "labels.txt"

STRATEGY_NOTE = """\
# Written by edge3d {version} from artifact {artifact!r} ({what}); regenerate it with
#   edge3d triton ARTIFACT -o REPO
# Implicit state: Triton keeps every sequence's (camera's) state tensors between requests and
# starts a new sequence from initial_state (zeros unless a data_file is named). The graph is a
# pure step(frame, state_in.*) -> (output, state_out.*), so it needs no control inputs.
# Strategy: oldest. Every batch row carries its own state rows, so requests of any sequences can
# share a batch in any order; "oldest" batches only the requests that are waiting, so no padded
# slot is computed for an idle camera and no READY input is needed. "direct" pins each sequence
# to a batch slot, which only models that keep per-slot state inside themselves require.
# max_candidate_sequences: the cameras one instance serves at once; more wait in a backlog until
# a sequence ends, so make it >= cameras / instances (edge3d triton --max-sequences).
# max_sequence_idle_microseconds: a camera silent this long loses its state (send sequence_start
# again); long enough to ride out a stalled camera, short enough to free slots of dead ones.
"""


def _onnx_type_name(elem_type: int) -> str:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def graph_io(path: Path) -> tuple[dict[str, tuple[str, list[Any]]], dict[str, tuple[str, list[Any]]]]:
    """Inputs and outputs of an ONNX file: name -> (dtype name, dims with None for dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def table(values: Any) -> dict[str, tuple[str, list[Any]]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out[v.name] = (_onnx_type_name(t.elem_type), dims)
        return out

    init = {i.name for i in model.graph.initializer}
    return table(i for i in model.graph.input if i.name not in init), table(model.graph.output)


def _triton_type(dtype: str, what: str) -> str:
    if dtype not in TRITON_TYPES:
        raise ArtifactError(f"{what} has dtype {dtype}, which Triton's config cannot express; re-export it.")
    return TRITON_TYPES[dtype]


def _dims(io: tuple[str, list[Any]], name: str, where: str) -> list[int]:
    """Dims without the batch axis; the batch axis must be dynamic for max_batch_size > 0."""
    dims = io[1]
    if not dims or dims[0] is not None:
        raise ArtifactError(
            f"{where}: {name} has a fixed first (stream) axis {dims[:1]}; Triton batches on it, so re-export "
            "the artifact with edge3d (which makes the stream axis dynamic)."
        )
    if any(d is None for d in dims[1:]):
        raise ArtifactError(f"{where}: {name} has dynamic dims {dims}; edge3d graphs are static but for the "
                            "stream axis, re-export the artifact.")
    return [int(d) for d in dims[1:]]


def build_config(manifest: dict[str, Any], io_path: Path, *, name: str, platform: str, backend: str,
                 model_file: str, max_batch: int, instances: int, kind: str, state_dtypes: dict[str, str],
                 max_sequences: int, idle_us: int, queue_delay_us: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The ModelConfig for one model, and the initial-state files it names (non-zero inits)."""
    from tritonclient.grpc import model_config_pb2 as mc

    inputs, outputs = graph_io(io_path)
    where = io_path.name
    cfg = mc.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=max_batch,
                         default_model_filename=model_file)
    state_in = {state_io_names(s["name"])[0]: s for s in manifest["states"]}
    state_out = {state_io_names(s["name"])[1]: s for s in manifest["states"]}
    missing = sorted((set(state_in) - set(inputs)) | (set(state_out) - set(outputs)))
    if missing:
        raise ArtifactError(f"{where} lacks the state tensors {missing[:3]} that manifest.json lists; re-export.")
    sb = cfg.sequence_batching
    for gname, io in inputs.items():
        if gname in state_in:
            continue
        if gname in CONTROL_INPUTS:
            ctl = sb.control_input.add(name=gname).control.add(kind=CONTROL_INPUTS[gname])
            if CONTROL_INPUTS[gname] == "CONTROL_SEQUENCE_CORRID":
                ctl.data_type = mc.DataType.Value(_triton_type(io[0], gname))
            elif io[0] == "bool":
                ctl.bool_false_true.extend([False, True])
            elif io[0].startswith("float"):
                ctl.fp32_false_true.extend([0.0, 1.0])
            else:
                ctl.int32_false_true.extend([0, 1])
            continue
        if gname != manifest["frame"].get("name", "frame"):
            raise ArtifactError(f"{where} has an input {gname!r} that is neither the frame, a state of the "
                                "manifest nor a sequence control; re-export the artifact.")
        cfg.input.add(name=gname, data_type=mc.DataType.Value(_triton_type(io[0], gname)),
                      dims=_dims(io, gname, where))
    named = bool(manifest["output"].get("classes")) and output_map(manifest) is None
    for gname, io in outputs.items():
        if gname not in state_out:
            out = cfg.output.add(name=gname, data_type=mc.DataType.Value(_triton_type(io[0], gname)),
                                 dims=_dims(io, gname, where))
            if named and gname == manifest["output"].get("name", "output"):
                out.label_filename = LABELS_FILE
    files: dict[str, np.ndarray] = {}
    for s in manifest["states"]:
        i, o = state_io_names(s["name"])
        dtype = state_dtypes.get(s["name"], s["dtype"])
        dims = [int(d) for d in s["shape"][1:]]
        for tensor, io in ((i, inputs[i]), (o, outputs[o])):
            if io[0] != dtype or _dims(io, tensor, where) != dims:
                raise ArtifactError(
                    f"{where}: {tensor} is {io[0]}{io[1][1:]} in the graph but {dtype}{dims} in manifest.json; "
                    "re-export the artifact instead of mixing files."
                )
        ttype = mc.DataType.Value(_triton_type(dtype, i))
        st = sb.state.add(input_name=i, output_name=o, data_type=ttype, dims=dims)
        init = st.initial_state.add(data_type=ttype, dims=dims, name=f"{s['name']}.initial")
        value = float(s.get("init", 0.0) or 0.0)
        if value == 0.0:
            init.zero_data = True
        else:
            init.data_file = f"{s['name']}.bin"
            files[init.data_file] = np.full(dims, value, dtype)
    sb.max_sequence_idle_microseconds = idle_us
    sb.oldest.max_candidate_sequences = max_sequences
    sb.oldest.max_queue_delay_microseconds = queue_delay_us
    group = cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.Kind.Value(KINDS[kind]))
    group.name = f"{name}_{kind}"
    return cfg, files


# What _write_model puts in a model folder; rewriting swaps the whole folder.
WRITTEN = {"config.pbtxt", MANIFEST_COPY, LABELS_FILE, "1", "initial_state"}


def check_replaceable(model_dir: Path) -> None:
    """Refuse to replace a model folder holding anything edge3d did not write there.

    A model folder is swapped whole (no half-written model), so another version a user keeps
    beside edge3d's (``2/``), or a same-named model from elsewhere, would be deleted silently.
    """
    if not model_dir.exists():
        return
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is a file where the model folder goes; remove it or pass --name.")
    if not (model_dir / MANIFEST_COPY).is_file():
        raise ValueError(f"{model_dir} is a model folder edge3d did not write (it has no {MANIFEST_COPY}); pass "
                         "--name to write this model under another name, or remove that folder.")
    extra = sorted(q.name + ("/" if q.is_dir() else "") for q in model_dir.iterdir() if q.name not in WRITTEN)
    if extra:
        raise ValueError(f"{model_dir} holds {', '.join(extra)} beside what edge3d wrote, and rewriting replaces "
                         "the whole folder; move them out first, or pass --name to write another model.")


def _write_model(repo: Path, cfg: Any, header: str, source: Path, model_file: str,
                 init_files: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    """Assemble one model folder beside the final one, then swap it in (no half-written model)."""
    from google.protobuf import text_format

    final = repo / cfg.name
    tmp = staging_folder(repo, f".{cfg.name}.")
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(source, tmp / "1" / model_file)
        if init_files:
            (tmp / "initial_state").mkdir()
            for fname, data in init_files.items():
                (tmp / "initial_state" / fname).write_bytes(np.ascontiguousarray(data).tobytes())
        (tmp / "config.pbtxt").write_text(header + text_format.MessageToString(cfg))
        if any(o.label_filename for o in cfg.output):  # one line per class: a newline in a name would shift the rest
            (tmp / LABELS_FILE).write_text("".join(" ".join(c.splitlines()) + "\n"
                                                   for c in manifest["output"]["classes"]))
        # The frame spec (resize, normalisation) and class names travel with the model, so a
        # client can preprocess frames without the artifact.
        (tmp / MANIFEST_COPY).write_text(json.dumps({k: v for k, v in manifest.items() if not k.startswith("_")},
                                                    indent=2))
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.old.", dir=repo))
            os.replace(final, old / "model")
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_repository(artifact: str | Path, repo_dir: str | Path, max_batch: int, console: Any = None,
                     model_name: str | None = None, instances: int = 1, *, profile: str = "fp32",
                     max_sequences: int | None = None, idle_seconds: float = 5.0, queue_delay_us: int = 0,
                     kind: str = "auto") -> Path:
    """Write (or refresh) this artifact's models in the Triton model repository ``repo_dir``.

    ``<name>/`` serves the ``profile`` ONNX graph with the onnxruntime backend; every engine in
    ``manifest["engines"]`` becomes ``<name>_trt_<profile>/`` (tensorrt_plan, on the GPU).
    ``max_batch`` bounds the streams stepped in one call; ``max_sequences`` (default
    ``max_batch``) is how many cameras one instance keeps as live sequences. Other models in
    the repository are left alone. Returns ``repo_dir``.
    """
    # named as the CLI flag and the Python argument, since both callers reach here
    for label, v in (("max_batch", max_batch), ("instances", instances), ("max_sequences", max_sequences)):
        if (v is not None or label != "max_sequences") and not is_positive_int(v):
            raise ValueError(f"--{label.replace('_', '-')} ({label} in Python) must be a positive integer, got {v!r}.")
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not one of {', '.join(KINDS)}.")
    if not idle_seconds > 0:
        raise ValueError(f"--idle-seconds (idle_seconds in Python) must be positive, got {idle_seconds!r}.")
    manifest = load_manifest(artifact)
    require_single_graph(manifest, "a Triton model repository")
    folder = Path(manifest["_folder"])
    name = model_name or manifest["name"] + ("" if profile == "fp32" else f"_{profile}")
    if not NAME.match(name):
        raise ValueError(f"model name {name!r} is not a valid Triton model folder name; pass --name with letters, "
                         "digits, '_', '-' or '.'.")
    repo = Path(repo_dir)
    common = {"instances": instances, "max_sequences": max_sequences or max_batch,
              "idle_us": int(idle_seconds * 1e6), "queue_delay_us": int(queue_delay_us)}

    entry = precision_entry(manifest, profile)
    onnx_path = folder / entry["file"]
    if not onnx_path.is_file():
        raise ArtifactError(f"the artifact lacks {entry['file']} ({onnx_path}); re-export it with `edge3d export`.")
    cfg, files = build_config(manifest, onnx_path, name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                              model_file="model.onnx", max_batch=max_batch, kind=kind,
                              state_dtypes=entry.get("state_dtypes", {}), **common)
    header = STRATEGY_NOTE.format(version=__version__, artifact=manifest["name"], what=f"{profile} ONNX")
    models = [(cfg, header, onnx_path, files)]

    for eprofile, engine in sorted(manifest.get("engines", {}).items()):
        plan = folder / engine["file"]
        if not plan.is_file():
            raise ArtifactError(f"manifest.json lists the {eprofile} engine {engine['file']} but the artifact lacks "
                                "it; rebuild it with `edge3d export --target tensorrt` or remove the entry.")
        # A strongly typed engine has the I/O of the ONNX graph it was built from.
        eentry = manifest["precisions"].get(eprofile, entry)
        batch = max_batch
        built_for = engine.get("max_batch") or engine.get("streams")
        if built_for and int(built_for) < max_batch:
            batch = int(built_for)
            if console is not None:
                console.print(f"[yellow]the {eprofile} engine was built for at most {batch} streams; its model "
                              f"gets max_batch_size {batch} (rebuild with --streams {max_batch} for more)[/]")
        ecfg, efiles = build_config(manifest, folder / eentry["file"], name=f"{name}_trt_{eprofile}",
                                    platform="tensorrt_plan", backend="tensorrt", model_file="model.plan",
                                    max_batch=batch, kind="gpu", state_dtypes=eentry.get("state_dtypes", {}),
                                    **common)
        eheader = STRATEGY_NOTE.format(version=__version__, artifact=manifest["name"],
                                       what=f"{eprofile} TensorRT engine; it runs only on the GPU model and "
                                            "TensorRT version it was built with")
        models.append((ecfg, eheader, plan, efiles))
    for c, *_ in models:
        check_replaceable(repo / c.name)
    # Everything is checked above; only now is anything written.
    repo.mkdir(parents=True, exist_ok=True)
    written = [(_write_model(repo, c, h, src, c.default_model_filename, f, manifest), c) for c, h, src, f in models]
    if console is not None:
        for path, c in written:
            console.print(f"  {path.name}/: config.pbtxt, 1/{c.default_model_filename} ({len(c.sequence_batching.state)} "
                          f"implicit states, oldest strategy, max_batch_size {c.max_batch_size}, {instances} instance(s))")
    return repo
