"""Check, at export, that a step module reproduces its model's clip forward.

``to_step`` sees the model only through the streaming layers of :mod:`edge3d.nn`. Forward code
that mixes frames by itself (``x.mean(dim=2)``, ``cumsum`` or ``flip`` over time, an index such as
``x[:, :, -1]``, a tensor kept on the module between calls) runs on one frame at a time in the step
and silently computes something else. The tests prove streaming equals offline for the zoo; this
check proves it for the model actually being exported, on a short random clip, before any file is
written. It looks for wrong structure, not float rounding: the tolerance is 1e-3 of the largest
output, where the tests allow 1e-4 of max(1, largest output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECK_FRAMES = 10
CHECK_STREAMS = 2  # two streams, so forward code that folds the batch into time is caught as well
TOLERANCE = 1e-3  # relative to max |clip output|: untrained models' outputs can be far below 1
SCALE_FLOOR = 1e-6


class StepMismatchError(ValueError):
    """The step module does not compute what the clip forward computes; the message says where."""


def _stream(step: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """A clip (N, C, T, H, W) through a single-rate step from its initial states, frame by frame;
    the outputs stacked on ``step.output_time_axis``, where the clip forward has its time axis."""
    states = step.initial_states(clip.shape[0])
    outs = []
    for t in range(clip.shape[2]):
        y, *states = step(clip[:, :, t], *states)
        outs.append(y)
    return torch.stack(outs, dim=step.output_time_axis)


def check_step_matches_clip(step: nn.Module, frames: int = CHECK_FRAMES, seed: int = 0) -> dict[str, Any]:
    """Stream a random clip through ``step`` and compare every output with ``step.model(clip)``.

    Returns ``{"frames", "outputs", "max_error", "scale"}``; raises :class:`StepMismatchError`
    at the first output that differs by more than ``TOLERANCE`` of the output scale.
    """
    model: nn.Module = step.model
    name = type(model).__name__
    periods = getattr(step, "periods", None)
    if periods:  # multi-rate: whole runs of the slowest stage, two of them at least
        frames = max(frames, 2 * periods[-1])
        frames += -frames % periods[-1]
    clip = _random_clip(step, frames, seed)
    with torch.no_grad():
        try:
            ref = model(clip)
        except Exception as e:  # whatever the user's forward raises, reported the same way
            raise StepMismatchError(
                f"{name} failed on a random {frames}-frame clip ({type(e).__name__}: {e}), so its step cannot be "
                "checked against the clip forward; fix the clip forward, or skip the check with --no-verify "
                "(verify=False in Python)."
            ) from e
        if not isinstance(ref, torch.Tensor):
            raise StepMismatchError(f"{name}'s clip forward returned a {type(ref).__name__}, not a tensor; edge3d "
                                    "needs one (N, classes, T) output to check the step against.")
        if periods:
            out, when = step.run_clip(clip)
            at = [int(t) for t in when]
            axis = 2
        else:
            axis = step.output_time_axis
            out = _stream(step, clip)
            at = list(range(frames))
    if tuple(out.shape) != tuple(ref.shape):
        raise StepMismatchError(
            f"{name}'s step gives outputs of shape {tuple(out.shape)} over a {frames}-frame clip, its clip forward "
            f"{tuple(ref.shape)}: its forward code changes the time axis outside the edge3d.nn layers; keep one "
            "output per frame (N, classes, T)."
        )
    if not torch.isfinite(ref).all():
        raise StepMismatchError(f"{name}'s clip forward gives NaN or Inf on a random clip, so its step cannot be "
                                "checked; fix the model (or its checkpoint), or skip the check with --no-verify "
                                "(verify=False in Python).")
    err, scale, i = _frame_errors(out.movedim(axis, 0).numpy(), ref.movedim(axis, 0).numpy())
    if i is not None:
        norms, several = _norms_over_time(model, clip)
        cause = (f"its {norms} {'take their' if several else 'takes its'} statistics over the clip's frames as "
                 "well as each frame's pixels, which one frame at a time cannot reproduce; apply it per frame, to "
                 "x reshaped to (N·T, C, H, W), or use BatchNorm3d" if norms else
                 "its forward code mixes frames outside the edge3d.nn layers (a mean, sum, cumsum, flip or index "
                 "over the time axis, or a tensor kept between calls), which one frame at a time cannot "
                 "reproduce; write that part with an edge3d.nn layer (RunningMean for a causal mean)")
        raise StepMismatchError(
            f"{name}'s step differs from its clip forward at frame {at[i]} of a random {frames}-frame clip (error "
            f"{float(err[i]):.3g} at output scale {scale:.3g}): {cause}, or skip this check with --no-verify "
            "(verify=False in Python)."
        )
    return {"frames": frames, "outputs": len(at), "max_error": float(err.max()), "scale": scale}


def _norms_over_time(model: nn.Module, clip: torch.Tensor) -> tuple[str, bool]:
    """The normalisation layers whose statistics span the time axis in the clip forward, named for
    the error ("blocks.0.norm (GroupNorm)"; empty if none), and whether there are several.

    GroupNorm, InstanceNorm3d and a LayerNorm over (T, H, W) on an (N, C, T, H, W) clip are the usual
    way a model built for clips stops being causal without a visible time op in its forward code.
    Known only by running the clip forward with hooks, since the same layer is per-frame on a
    reshaped input.
    """
    found: list[str] = []
    frames = clip.shape[2]

    def spans_time(module: nn.Module, x: torch.Tensor) -> bool:
        if x.dim() != 5 or x.shape[2] != frames:
            return False
        if isinstance(module, nn.LayerNorm):
            return len(module.normalized_shape) >= 3  # normalises the last axes: T, H, W
        return isinstance(module, (nn.GroupNorm, nn.InstanceNorm3d))

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and spans_time(module, args[0]) and path not in found:
                found.append(path)
        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in model.named_modules()
               if isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d, nn.LayerNorm))]
    try:
        with torch.no_grad():
            model(clip)
    except Exception:  # it ran once already; a second failure leaves the general message
        return "", False
    finally:
        for h in handles:
            h.remove()
    named = [f"{p} ({type(model.get_submodule(p)).__name__})" for p in found[:3]]
    return ", ".join(named) + (f" and {len(found) - 3} more" if len(found) > 3 else ""), len(found) > 1


def _random_clip(step: nn.Module, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(CHECK_STREAMS, step.frame_shape[0], frames, *step.frame_shape[1:], generator=g)


def _frame_errors(got: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float, int | None]:
    """Outputs stacked (outputs, ...): each output's largest error (NaN counted as infinite), the
    reference's scale, and the index of the first output off by more than ``TOLERANCE`` of it."""
    scale = max(SCALE_FLOOR, float(np.abs(ref).max()))
    err = np.nan_to_num(np.abs(got - ref), nan=np.inf).reshape(len(ref), -1).max(axis=1)
    bad = np.flatnonzero(err > TOLERANCE * scale)
    return err, scale, (int(bad[0]) if len(bad) else None)


def _refuse_graph_mismatch(got: np.ndarray, ref: np.ndarray, at: list[int], frames: int, what: str) -> float:
    """Compare outputs stacked (outputs, streams, ...) and return the largest error relative to the
    reference's largest output; raise naming the first frame off by more than ``TOLERANCE``."""
    err, scale, i = _frame_errors(got, ref)
    if i is not None:
        raise StepMismatchError(
            f"the exported ONNX {what} from the PyTorch step at frame {at[i]} of a random {frames}-frame clip "
            f"(error {err[i]:.3g} at output scale {scale:.3g}): an op of this model is not translated faithfully; "
            "please report it to edge3d with the model, or skip this check with --no-verify (verify=False in Python) "
            "at your own risk."
        )
    return float(err.max() / scale)


def check_onnx_matches_step(onnx_path: Path, step: nn.Module, frames: int = CHECK_FRAMES, seed: int = 1) -> float:
    """Stream a random clip through the exported graph (ONNX Runtime, states fed back) and through
    ``step`` in PyTorch; returns the largest error relative to the step's largest output.

    The tests prove this for the zoo; here it is proved for the graph being written, after the
    exporter, the simplifier and the BatchNorm folding have all had their say. Raises
    :class:`StepMismatchError` naming the first frame off by more than ``TOLERANCE``.
    """
    import onnxruntime as ort

    from .runtime.manifest import state_io_names

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the runtime loads it
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [state_io_names(s.name) for s in step.state_specs]
    outputs = ["output"] + [o for _, o in names]
    clip = _random_clip(step, frames, seed)
    with torch.no_grad():
        ref = _stream(step, clip).movedim(step.output_time_axis, 0).numpy()
        feeds = {i: s.numpy() for (i, _), s in zip(names, step.initial_states(CHECK_STREAMS), strict=True)}
    got = []
    for t in range(frames):
        res = sess.run(outputs, {"frame": clip[:, :, t].numpy(), **feeds})
        got.append(res[0])
        feeds = {i: v for (i, _), v in zip(names, res[1:], strict=True)}
    return _refuse_graph_mismatch(np.stack(got), ref, list(range(frames)), frames, "graph differs")


def check_staged_onnx_matches_step(folder: Path, step: nn.Module, frames: int, seed: int = 1,
                                   streams: int = CHECK_STREAMS) -> float:
    """The multi-rate form: a random clip through the stage graphs as the runtime runs them (its
    staged session routes each stage's outputs into the buffers the next stage reads) against
    ``step.run_clip``; ``frames`` should be whole runs of the slowest stage. ``folder`` holds the
    stage graphs and a manifest.json that records them. A stage graph whose batch its forward code
    fixed at 1 is checked on one stream, as it can run.
    """
    from .runtime import Session

    clip = _random_clip(step, frames, seed)[:streams]
    with torch.no_grad():
        ref, when = step.run_clip(clip)
    got = []
    with Session(folder, streams=streams) as s:
        for t in range(frames):
            y = s.step_batch(list(clip[:, :, t].numpy()))
            if s.last_fresh:
                got.append(y)
    if len(got) != len(when):
        raise StepMismatchError(
            f"the exported stage graphs gave {len(got)} outputs over a random {frames}-frame clip where the PyTorch "
            f"step gives {len(when)}: the manifest's stage rates do not match the model; please report it to edge3d."
        )
    return _refuse_graph_mismatch(np.stack(got), ref.movedim(2, 0).numpy(), [int(t) for t in when], frames,
                                  "stage graphs differ")
