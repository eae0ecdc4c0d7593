"""Multi-rate models as a chain of stages, each a pure step function with its own states.

A layer with temporal stride s (``CausalConv3d(stride=(s, ., .))``, ``CausalTemporalPool``)
makes everything after it run s times slower, which one per-frame step function cannot
express. So the model is cut at its rate changes into stages. Stage k runs every P_k input
frames (its *period*; P_0 = 1) and is, like a single-rate step module, a pure function

    stage_k(inputs, *states_k) -> (outputs, *new_states_k)

Stage 0's input is the frame. A strided layer at the boundary into stage k reads a *buffer*
holding its last s inputs (s = P_k / P_{k-1}), channel-stacked oldest first: stage k-1 emits
one frame for that buffer per run (a ``feed``), the scheduler (PyTorch here, numpy in
``edge3d.runtime.staged``) writes it into slot j mod s, and stage k runs when the buffer is full,
i.e. at frames t with (t + 1) mod P_k == 0. Strided layers that read the same tensor share one
buffer. Buffers are ring states like any other and count in the cache bytes.

How a stage is built without rewriting the model: stage k runs the model's *own* forward under
a :class:`StageContext`. Streaming layers of stage k step normally; a strided layer into stage k
ignores its (dead) input and computes from its buffer; a strided layer out of stage k records
its input as a feed; every other streaming layer runs from its initial state on a dummy frame.
Those upstream and downstream computations feed nothing the stage returns, so they are dead
code the exporter drops. If a path *bypasses* the boundary (a residual skip that crosses a rate
change without a strided layer), the stage's output would depend on the dummy frame: that is
detected by running each stage on a NaN dummy and naming the module where NaN meets the live
values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .convert import ONE_OUTPUT_FIX, collect_specs, frame_shape_error
from .nn.state import StateSpec, StepContext, StreamingModule, stepping
from .runtime.manifest import BUFFER_IN, FEED_OUT, buffer_io_names


class UnsupportedRateError(ValueError):
    """A rate change the staged step module cannot express; the message names the module path."""


def _error(msg: str) -> Exception:
    from .convert import UnsupportedModelError

    return UnsupportedModelError(msg)


def temporal_stride(m: nn.Module) -> int:
    return int(getattr(m, "temporal_stride", 1))


def is_multirate(model: nn.Module) -> bool:
    """True when the model changes its frame rate inside (strided layers or SGS)."""
    from .nn.sgs import SimilarityGuidedSampling

    return any((isinstance(m, StreamingModule) and temporal_stride(m) > 1) or isinstance(m, SimilarityGuidedSampling)
               for m in model.modules())


def require_single_rate(model: nn.Module, name: str, what: str) -> None:
    """The model-side twin of ``runtime.manifest.require_single_graph``: refuse before exporting."""
    if is_multirate(model):
        from .runtime.manifest import multirate_message

        raise ValueError(multirate_message(name, what))


@dataclass(frozen=True)
class BufferSpec:
    """The last ``stride`` outputs of stage ``from_stage`` that strided layers of ``to_stage`` read."""

    name: str
    frame_shape: tuple[int, ...]
    stride: int
    from_stage: int
    to_stage: int
    layers: tuple[str, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, ...]:
        """(s·C, H, W): the s frames stacked on the channel axis, oldest first (no batch axis)."""
        return (self.stride * self.frame_shape[0], *self.frame_shape[1:])

    @property
    def bytes(self) -> int:
        return 4 * math.prod(self.shape)

    def initial(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.shape)


class StageContext(StepContext):
    """A :class:`StepContext` that runs only one stage's layers for real (see the module doc)."""

    def __init__(self, roles: dict[nn.Module, str], windows: dict[nn.Module, torch.Tensor],
                 states: dict[nn.Module, tuple[torch.Tensor, ...]] | None, keep_time: bool, lower: bool,
                 names: dict[nn.Module, str], dead_value: float = 0.0,
                 shapes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] | None = None) -> None:
        super().__init__(states, keep_time, lower, names)
        self.roles, self.windows = roles, windows
        self.dead_value = dead_value
        self.shapes = {} if shapes is None else shapes
        self.feeds: list[tuple[nn.Module, torch.Tensor]] = []
        self.consumed = 0

    def run(self, module: StreamingModule, x: torch.Tensor) -> torch.Tensor:
        role = self.roles.get(module, "dead")
        if role == "live":
            return super().run(module, x)
        xs = x.select(2, 0) if self.keep_time else x
        if role == "consume":
            if self.discover:
                specs = module.window_state_specs(tuple(xs.shape[1:]))
                self.specs[module] = specs
                state = tuple(s.initial(xs.shape[0], xs.device) for s in specs)
            else:
                state = self.states.get(module, ())
            y, *new = module.forward_window(self.windows[module], *state)
            self.new_states[module] = tuple(new)
            self.order.append(module)
            self.consumed += 1
        else:
            if role == "feed":
                self.feeds.append((module, xs))
            key = (id(module), tuple(xs.shape[1:]))
            if key not in self.shapes:
                with torch.no_grad():
                    self.shapes[key] = tuple(dead_output(module, xs[:1]).shape[1:])
            # Dead values are a constant (NaN when checking for bypasses): cheap in eager mode,
            # and anything computed from them is constant-folded away at export.
            y = torch.full((xs.shape[0], *self.shapes[key]), self.dead_value, dtype=xs.dtype, device=xs.device)
        return y.unsqueeze(2) if self.keep_time else y


def dead_output(module: StreamingModule, x: torch.Tensor) -> torch.Tensor:
    """A correctly shaped output computed from initial states: only ever flows into dead code."""
    fs = tuple(x.shape[1:])
    s = temporal_stride(module)
    if s > 1:
        st = tuple(sp.initial(x.shape[0], x.device) for sp in module.window_state_specs(fs))
        return module.forward_window(torch.cat([x] * s, dim=1), *st)[0]
    st = tuple(sp.initial(x.shape[0], x.device) for sp in module.state_specs(fs))
    return module.forward_step(x, *st)[0]


class Stage(nn.Module):
    """Base of one stage: ``forward(*inputs, *states) -> (*outputs, *new_states)``."""

    index: int
    period: int
    stride: int
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int, ...]]
    specs: list[StateSpec]

    def initial_states(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return tuple(s.initial(batch) for s in self.specs)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, *s) for s in self.input_shapes)


class ModelStage(Stage):
    """Stage k of a model with strided layers, run through its own forward (see the module doc)."""

    def __init__(self, owner: StagedStepModule, index: int, in_buffers: list[BufferSpec]) -> None:
        super().__init__()
        self.model = owner.model
        self.index, self.period = index, owner.periods[index]
        self.stride = 1 if index == 0 else owner.periods[index] // owner.periods[index - 1]
        self.last = index == len(owner.periods) - 1
        self.frame_shape, self.keep_time, self.lower = owner.frame_shape, owner.keep_time, owner.lower
        self._names = owner.names
        self.roles = owner.roles[index]
        self.in_buffers = in_buffers
        self.consumer_buffer = {m: i for i, b in enumerate(in_buffers) for m in owner.buffer_layers[b.name]}
        self.out_buffers: list[BufferSpec] = []
        self.dead_value = 0.0
        self._shapes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
        self._layers: list[nn.Module] = []
        self._counts: list[int] = []
        self.specs = []
        if index == 0:
            self.input_names, self.input_shapes = ["frame"], [self.frame_shape]
        else:
            self.input_names = [buffer_io_names(b.name)[0] for b in in_buffers]
            self.input_shapes = [b.shape for b in in_buffers]

    def discover(self) -> list[tuple[list[nn.Module], torch.Tensor]]:
        """Record this stage's states; return its feeds grouped by the tensor they read."""
        ctx = self._run(self.example_inputs(1), None)
        layers, counts, specs = collect_specs(self.model, self._names, ctx, sees_frame=self.index == 0)
        self._layers += layers
        self._counts += counts
        self.specs += specs
        groups: list[tuple[list[nn.Module], torch.Tensor]] = []
        for m, x in ctx.feeds:
            for mods, t in groups:
                if t is x:
                    mods.append(m)
                    break
            else:
                groups.append(([m], x))
        return groups

    def set_outputs(self, out_buffers: list[BufferSpec]) -> None:
        self.out_buffers = out_buffers
        self.output_names = ["output"] if self.last else [buffer_io_names(b.name)[1] for b in out_buffers]

    def _run(self, inputs: Sequence[torch.Tensor], by_layer: dict | None) -> StageContext:
        if self.index == 0:
            frame = inputs[0]
            windows: dict[nn.Module, torch.Tensor] = {}
        else:
            # The frame of an upstream stage is dead here: make it from the batch size only.
            frame = torch.full((inputs[0].shape[0], *self.frame_shape), self.dead_value, dtype=inputs[0].dtype)
            windows = {m: inputs[i] for m, i in self.consumer_buffer.items()}
        ctx = StageContext(self.roles, windows, by_layer, self.keep_time, self.lower, self._names,
                           self.dead_value, self._shapes)
        x = frame.unsqueeze(2) if self.keep_time else frame
        ctx.frame = x
        with stepping(ctx):
            out = self.model(x)
        if not isinstance(out, torch.Tensor):
            raise _error(f"{type(self.model).__name__}: forward must return one tensor to be streamed, got "
                         f"{type(out).__name__}; {ONE_OUTPUT_FIX}.")
        ctx.result = out.select(2, 0) if self.keep_time else out  # type: ignore[attr-defined]
        return ctx

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.input_names)
        inputs, states = args[:n], args[n:]
        if len(states) != len(self.specs):
            raise ValueError(f"stage {self.index} expects {len(self.specs)} state tensors, got {len(states)}.")
        by_layer: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        i = 0
        for m, c in zip(self._layers, self._counts, strict=True):
            by_layer[m] = tuple(states[i:i + c])
            i += c
        ctx = self._run(inputs, by_layer)
        if self.last:
            outs: list[torch.Tensor] = [ctx.result]  # type: ignore[attr-defined]
        else:
            fed = {m: x for m, x in ctx.feeds}
            outs = [fed[self._owner_first[b.name]] for b in self.out_buffers]
        new = [ctx.new_states.get(m, by_layer[m]) for m in self._layers]
        return (*outs, *[t for g in new for t in g])


class StagedStepModule(nn.Module):
    """A multi-rate model as stages plus the buffers between them (see the module doc).

    ``stages[k]`` is a pure step function run every ``periods[k]`` frames; :meth:`init_carry`
    and :meth:`step` schedule them in PyTorch exactly as the runtime does.
    """

    def __init__(self, model: nn.Module, frame_shape: Sequence[int], keep_time: bool | None = None,
                 lower: bool = True) -> None:
        super().__init__()
        model.eval()
        self.model = model
        self.frame_shape = tuple(int(v) for v in frame_shape)
        if keep_time is None:
            keep_time = not getattr(model, "steps_without_time_axis", False)
        self.keep_time, self.lower = keep_time, lower
        self.names = {m: (p or type(model).__name__) for p, m in model.named_modules()}
        self.periods, self.roles = self._plan()
        self.buffers: list[BufferSpec] = []
        self.buffer_layers: dict[str, list[nn.Module]] = {}
        stages: list[Stage] = []
        in_buffers: list[BufferSpec] = []
        for k in range(len(self.periods)):
            st = ModelStage(self, k, in_buffers)
            groups = st.discover()
            out: list[BufferSpec] = []
            st._owner_first = {}
            if k + 1 < len(self.periods):
                s = self.periods[k + 1] // self.periods[k]
                for mods, x in groups:
                    name = self.names[mods[0]]
                    b = BufferSpec(name, tuple(x.shape[1:]), s, k, k + 1, tuple(self.names[m] for m in mods))
                    out.append(b)
                    self.buffer_layers[name] = mods
                    st._owner_first[name] = mods[0]
                consumers = [m for m, r in self.roles[k + 1].items() if r == "consume"]
                missing = [m for m in consumers if not any(m in mods for mods, _ in groups)]
                if missing:
                    raise _error(f"{self.names[missing[0]]}: its input is not computed in stage {k} (period "
                                 f"{self.periods[k]}); a strided layer must read the previous stage's frames.")
            st.set_outputs(out)
            self.buffers += out
            stages.append(st)
            in_buffers = out
        self.stages = nn.ModuleList(stages)
        for st in stages:
            _check_no_bypass(st, self.names)

    # ------------------------------------------------------------------ planning
    def _plan(self) -> tuple[list[int], list[dict[nn.Module, str]]]:
        rates, out_period = discover_rates(self.model, self.frame_shape, self.keep_time, self.names)
        periods = sorted({p for pin, pout in rates.values() for p in (pin, pout)} | {1})
        roles: list[dict[nn.Module, str]] = [{} for _ in periods]
        for m, (pin, pout) in rates.items():
            s = temporal_stride(m)
            if s == 1:
                roles[periods.index(pin)][m] = "live"
                continue
            i, o = periods.index(pin), periods.index(pout)
            if o != i + 1:
                raise _error(
                    f"{self.names[m]}: temporal stride {s} takes frames of period {pin} to period {pout}, "
                    f"skipping the stage that runs every {periods[i + 1]} frames; rate changes must chain "
                    "(each stride must divide the next stage's period and start from the previous stage)."
                )
            roles[o][m] = "consume"
            roles[i][m] = "feed"
        if out_period != periods[-1]:
            raise _error(f"{type(self.model).__name__}: the output runs every {out_period} frames but the slowest "
                         f"stage every {periods[-1]}; the model output must come from the last stage.")
        return periods, roles

    # ------------------------------------------------------------------ scheduling
    @property
    def state_specs(self) -> list[StateSpec]:
        return [s for st in self.stages for s in st.specs]

    def init_carry(self, batch: int = 1) -> dict[str, Any]:
        return {"t": 0, "states": [list(st.initial_states(batch)) for st in self.stages],
                "buffers": {b.name: b.initial(batch) for b in self.buffers}, "extras": {}}

    def step(self, frame: torch.Tensor, carry: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """One frame: run every stage that is due; returns (output if fresh else None, new carry)."""
        t = carry["t"]
        states = [list(s) for s in carry["states"]]
        buffers = dict(carry["buffers"])
        extras = dict(carry["extras"])
        out = None
        ins: list[torch.Tensor] = [frame]
        for k, st in enumerate(self.stages):
            if (t + 1) % st.period:
                break
            if k > 0:
                ins = [buffers[n.removeprefix(BUFFER_IN)] for n in st.input_names]
            with torch.no_grad():
                res = st(*ins, *states[k])
            n_out = len(st.output_names)
            outs, states[k] = res[:n_out], list(res[n_out:])
            if k + 1 < len(self.stages):
                nxt = self.stages[k + 1]
                slot = ((t + 1) // st.period - 1) % nxt.stride
                for name, y in zip(st.output_names, outs, strict=True):
                    key = name.removeprefix(FEED_OUT)
                    c = y.shape[1]
                    buf = buffers[key].clone()
                    buf[:, slot * c:(slot + 1) * c] = y
                    buffers[key] = buf
            else:
                out = outs[0]
                extras = dict(zip(st.output_names[1:], outs[1:], strict=True))
        return out, {"t": t + 1, "states": states, "buffers": buffers, "extras": extras}

    def run_clip(self, clip: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Step a clip (N, C, T, H, W) frame by frame; fresh outputs stacked on axis 2 and their frames."""
        carry = self.init_carry(clip.shape[0])
        outs, when = [], []
        for t in range(clip.shape[2]):
            y, carry = self.step(clip[:, :, t], carry)
            if y is not None:
                outs.append(y)
                when.append(t)
        return torch.stack(outs, dim=2), when

    def report(self) -> dict[str, Any]:
        """Params, amortised MACs per frame, states and buffers (what ``edge3d inspect`` prints)."""
        from torch.utils.flop_counter import FlopCounterMode

        from .accounting import dtype_name

        stages = []
        for st in self.stages:
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                st(*st.example_inputs(1), *st.initial_states(1))
            stages.append({"index": st.index, "rate": st.period, "stride": st.stride, "inputs": st.input_names,
                           "outputs": st.output_names, "states": [s.name for s in st.specs],
                           "macs_per_run": int(fc.get_total_flops()) // 2})
        states = [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "kind": s.kind,
                   "bytes": s.bytes, "layer": s.layer, "input_history": s.input_history, "stage": st.index}
                  for st in self.stages for s in st.specs]
        buffers = [{"name": buffer_io_names(b.name)[0], "shape": list(b.shape), "dtype": "float32", "kind": "ring",
                    "bytes": b.bytes, "layer": ",".join(b.layers), "input_history": False,
                    "from_stage": b.from_stage, "to_stage": b.to_stage, "stride": b.stride} for b in self.buffers]
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "macs_per_frame": int(sum(s["macs_per_run"] / s["rate"] for s in stages)),
            "state_bytes": sum(s["bytes"] for s in states if not s["input_history"]) + sum(b["bytes"] for b in buffers),
            "input_history_bytes": sum(s["bytes"] for s in states if s["input_history"]),
            "frame_shape": list(self.frame_shape),
            "states": states + buffers,
            "stages": stages,
            "buffers": buffers,
        }


def discover_rates(model: nn.Module, frame_shape: Sequence[int], keep_time: bool,
                   names: dict[nn.Module, str]) -> tuple[dict[nn.Module, tuple[int, int]], int]:
    """Input and output period of every streaming layer, from a clip forward on meta tensors.

    The clip has twice as many frames as the product of all temporal strides, so every period
    divides it and no rate's time axis has length 1 (which would broadcast against another
    rate and hide a path that crosses a rate change); meta tensors carry shapes only, so this
    costs nothing even for a full-size model.
    """
    strided = [m for m in model.modules() if isinstance(m, StreamingModule) and temporal_stride(m) > 1]
    T = 2 * math.prod(temporal_stride(m) for m in strided)
    if T > 4096:
        raise _error(f"{type(model).__name__}: the temporal strides multiply to {T} frames per output; "
                     "edge3d supports at most 4096.")
    seen: dict[nn.Module, tuple[int, int]] = {}
    stack: list[nn.Module] = []
    handles = []

    def pre(m: nn.Module, args: tuple) -> None:
        stack.append(m)

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(m, StreamingModule) and args and isinstance(out, torch.Tensor):
            seen[m] = (T // args[0].shape[2], T // max(out.shape[2], 1))
        stack.pop()

    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    meta = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    clip = torch.zeros(1, *frame_shape[:1], T, *frame_shape[1:], device="meta")
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, meta, (clip,))
    except Exception as e:
        where = names.get(stack[-1], type(model).__name__) if stack else type(model).__name__
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if not seen:  # no streaming layer has run yet: the input itself does not fit the model
            raise frame_shape_error(model, frame_shape, f"{where}: {first}") from e
        raise _error(f"{where}: the clip forward fails on {T} frames ({first}); a path probably crosses a rate "
                     "change without a strided layer (e.g. a residual skip around a temporal stride).") from e
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() < 3:
        raise _error(f"{type(model).__name__}: a multi-rate model must return a clip tensor (N, K, T, ...).")
    return seen, T // out.shape[2]


def _check_no_bypass(stage: Stage, names: dict[nn.Module, str]) -> None:
    """Fail if a stage's outputs depend on frames of an earlier stage other than through its buffers."""
    if not isinstance(stage, ModelStage) or stage.index == 0:
        return
    found: list[nn.Module] = []
    consumed = {"n": 0}
    stack: list[int] = []
    handles = []

    def pre(m: nn.Module, args: tuple) -> None:
        stack.append(consumed["n"])

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        before = stack.pop()
        if stage.roles.get(m) == "consume":
            consumed["n"] += 1
        elif consumed["n"] > before and isinstance(out, torch.Tensor) and torch.isnan(out).any() and not found:
            found.append(m)

    for m in stage.model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    stage.dead_value = float("nan")
    try:
        with torch.no_grad():
            res = stage(*stage.example_inputs(1), *stage.initial_states(1))
    finally:
        stage.dead_value = 0.0
        for h in handles:
            h.remove()
    bad = [n for n, r in zip(stage.output_names, res, strict=False) if torch.isnan(r).any()]
    if bad:
        where = names[found[0]] if found else type(stage.model).__name__
        raise _error(f"{where}: its output mixes frames from before the rate change into stage {stage.index} "
                     f"(period {stage.period}) with frames after it; a path (e.g. a residual skip) crosses the rate "
                     "boundary without a strided layer. Give the path its own strided layer (e.g. a 1×1×1 "
                     "CausalConv3d or CausalTemporalPool with the same temporal stride).")
