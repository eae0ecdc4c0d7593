"""Staged (multi-rate) step module -> one ONNX graph per stage plus a manifest with ``stages``.

Each stage is exported and simplified exactly like a single-rate step graph (dynamic stream
axis, basic op-preserving folding, ``onnx.checker``). Stage k > 0 contains the model's upstream
layers only as dead code computed from constants, which export and folding drop; a check
here makes sure no stage still takes the frame or any node of an earlier stage's kind leaks in
(the graph's inputs are exactly its buffers and its own states).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from ..runtime.manifest import BUFFER_IN, MANIFEST, state_io_names
from ..staged import Stage, StagedStepModule
from .onnx import (
    artifact_folder,
    drop_raw,
    file_sha256,
    manifest_header,
    quiet,
    set_metadata,
    simplify,
    step_output_shape,
    weight_bytes,
)


def _export_stage(stage: Stage, path: Path, opset: int) -> None:
    """Trace one stage with its stream axis dynamic, on two streams, as the single-rate export does:
    traced on one, the SGS stage's batched matmuls specialised the axis to 1 and the graph took one
    stream only."""
    inputs = list(stage.example_inputs(2))
    states = list(stage.initial_states(2))
    names_in = stage.input_names + [state_io_names(s.name)[0] for s in stage.specs]
    names_out = stage.output_names + [state_io_names(s.name)[1] for s in stage.specs]
    batch = torch.export.Dim("streams", min=1, max=4096)
    dynamic = (tuple({0: batch} for _ in inputs + states),)  # forward(*args): one var-positional entry
    with quiet():
        torch.onnx.export(stage, (*inputs, *states), str(path), input_names=names_in, output_names=names_out,
                          dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
                          external_data=False)


def _io(values: list[Any]) -> list[dict[str, Any]]:
    """Name, shape and dtype of graph inputs or outputs. The batch axis is "N" where the graph
    leaves it free, else its fixed size (a stage whose forward code fixed its batch)."""
    out = []
    for v in values:
        t = v.type.tensor_type
        d0 = t.shape.dim[0]
        batch: str | int = "N" if d0.dim_param or not d0.HasField("dim_value") else int(d0.dim_value)
        out.append({"name": v.name, "shape": [batch, *[d.dim_value for d in t.shape.dim[1:]]],
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
    return out


def export_staged(step: StagedStepModule, out_dir: Path, name: str, *, model_info: dict[str, Any],
                  classes: list[str] | None, mean: tuple[float, ...], std: tuple[float, ...], opset: int,
                  progress: Callable[[str], None] | None = None, fit: str = "stretch",
                  color: str = "RGB", fps: float | None = None) -> Path:
    """Write ``out_dir/<name>.edge3d/`` with ``stage<k>.fp32.onnx`` per stage and the manifest."""
    report = step.report()
    with artifact_folder(out_dir, name) as (tmp, manifest):
        files = []
        for st in step.stages:
            if progress:
                progress(f"tracing stage {st.index + 1} of {len(step.stages)} (torch.export)")
            raw = tmp / f"raw{st.index}.onnx"
            _export_stage(st, raw, opset)
            path = tmp / f"stage{st.index}.fp32.onnx"
            simplify(raw, path)
            drop_raw(raw)
            files.append(path)
        manifest.update(manifest_header(step.model, step.frame_shape, name, model_info=model_info,
                                        classes=classes, mean=mean, std=std, output_shape=step_output_shape(step),
                                        fit=fit, color=color, fps=fps))
        manifest.update({
            "states": [{**{k: v for k, v in s.items() if k != "shape"}, "shape": ["N", *s["shape"]],
                        **dict(zip(("input", "output"), state_io_names(s["name"]), strict=True))}
                       for s in report["states"] if not s["name"].startswith(BUFFER_IN)],
            "buffers": [{**b, "shape": ["N", *b["shape"]]} for b in report["buffers"]],
            "macs_per_frame": report["macs_per_frame"],
            "params": report["params"],
            "state_bytes": report["state_bytes"],
            "input_history_bytes": report["input_history_bytes"],
            "lowered": step.lower,
            "output_period": step.periods[-1],
        })
        stages = []
        for st, meta, path in zip(step.stages, report["stages"], files, strict=True):
            g = onnx.load(str(path)).graph
            state_inputs = {state_io_names(s.name)[0] for s in st.specs}
            ins = [i for i in _io(list(g.input)) if i["name"] not in state_inputs]
            outs = [o for o in _io(list(g.output)) if not o["name"].startswith("state_out.")]
            if [i["name"] for i in ins] != st.input_names:
                raise ValueError(f"stage {st.index} graph takes {[i['name'] for i in ins]}, expected {st.input_names}; "
                                 "an upstream value leaked into it.")
            stages.append({"index": st.index, "file": path.name, "rate": st.period, "stride": st.stride,
                           "inputs": ins, "outputs": outs, "states": [s.name for s in st.specs],
                           "macs_per_run": meta["macs_per_run"]})
        manifest["stages"] = stages
        manifest["precisions"]["fp32"] = {
            "file": files[0].name, "files": [p.name for p in files], "profile": "fp32",
            "state_dtypes": {s["name"]: s["dtype"] for s in manifest["states"]},
        }
        for k, path in enumerate(files):
            set_metadata(path, {**{key: v for key, v in manifest.items() if key != "precisions"}, "stage": k})
            onnx.checker.check_model(str(path), full_check=True)
        manifest["precisions"]["fp32"]["weight_bytes"] = sum(weight_bytes(p) for p in files)
        manifest["precisions"]["fp32"]["sha256"] = [file_sha256(p) for p in files]
        check = manifest["model"].get("step_check")
        if check is not None:  # the stage graphs as the runtime runs them, against the step they came from
            from ..equivalence import check_staged_onnx_matches_step

            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # what the runtime reads; rewritten below
            one_batch = any(i["shape"][0] != "N" for st in stages for i in st["inputs"])  # code that fixed its batch
            check["onnx_max_error_relative"] = check_staged_onnx_matches_step(tmp, step, check["frames"],
                                                                              streams=1 if one_batch else 2)
    return out_dir / f"{name}.edge3d"
