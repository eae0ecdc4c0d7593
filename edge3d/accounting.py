"""Parameters, per-frame multiply-accumulates and state memory of a streaming model.

MACs are counted on the *step* function (what runs per frame online), from the convolution
and matrix-multiply FLOPs PyTorch's ``FlopCounterMode`` reports, halved. State bytes separate
the input-frame history (frames the first temporal conv needs) from intermediate caches,
as the D3D paper's cache sizes do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .convert import StepModule, modes_kept, to_step

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8",
                torch.uint8: "uint8", torch.int64: "int64", torch.int32: "int32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def count_macs(step: StepModule, batch: int = 1) -> int:
    """Multiply-accumulates of one step (conv, linear and matmul ops), for one stream."""
    frame = torch.zeros(batch, *step.frame_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step(frame, *step.initial_states(batch))
    return int(counter.get_total_flops()) // 2 // batch


def inspect(model: nn.Module, frame_size: int | tuple[int, int] = 112, channels: int | None = None) -> dict[str, Any]:
    """Report of a model's streaming cost: params, MACs per frame and every state tensor.

    ``model`` may be a clip-mode model or an existing :class:`StepModule`. ``channels`` left out is
    the model's, as ``edge3d inspect`` and ``export_artifact`` take it (a grey model has one).
    """
    if not isinstance(model, nn.Module):
        hint = (f": build it first, edge3d.zoo.build({model!r}) for a zoo model" if isinstance(model, str)
                else "")
        raise ValueError(f"inspect needs a torch.nn.Module, got {type(model).__name__}{hint}.")
    with modes_kept(model.model if isinstance(model, StepModule) else model):  # the caller may go on training it
        if isinstance(model, StepModule):
            step = model
        else:
            from .models import frame_channels

            channels = frame_channels(model, channels)
            if isinstance(frame_size, int):
                frame_size = (frame_size, frame_size)
            if not isinstance(frame_size, (tuple, list)) or len(frame_size) != 2:
                # to_step gets (C, H, W); a bare unpack let a float, a string or a (C, H, W) fail as a TypeError
                raise ValueError(f"frame_size must be an integer or an (H, W) pair, got {frame_size!r}; the channels "
                                 "are the separate `channels` argument.")
            step = to_step(model, (channels, *frame_size))
        if hasattr(step, "report"):  # multi-rate: per-stage MACs, states and buffers (edge3d.staged)
            return step.report()
        states = [
            {"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "kind": s.kind,
             "bytes": s.bytes, "layer": s.layer, "input_history": s.input_history}
            for s in step.state_specs
        ]
        return {
            "params": sum(p.numel() for p in step.model.parameters()),
            "macs_per_frame": count_macs(step),
            "state_bytes": sum(s["bytes"] for s in states if not s["input_history"]),
            "input_history_bytes": sum(s["bytes"] for s in states if s["input_history"]),
            "frame_shape": list(step.frame_shape),
            "states": states,
        }
