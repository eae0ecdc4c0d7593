"""Turn a clip-mode model built from :mod:`edge3d.nn` layers into a pure step function.

``to_step`` runs the model's *own* forward on a single frame while a :class:`StepContext`
routes every streaming layer's state in and out of the call. This works for any nesting and
for custom forward code, because nothing about the model is rewritten: the layers simply
switch to their step implementation while the context is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .nn.rnn import _CellHead
from .nn.state import StateSpec, StepContext, StreamingModule, stepping
from .runtime.manifest import is_positive_int

# what a model returning several outputs (logits and features, a dict of heads) does to export one
ONE_OUTPUT_FIX = ("export the one the app needs, through a wrapper module whose forward returns it "
                  "(model(x)[0], or model(x)['logits'])")


class UnsupportedModelError(ValueError):
    """The model contains a layer that cannot be streamed; the message names its path."""


def _temporal(v: int | Sequence[int] | None) -> int | None:
    if v is None:
        return None
    return v if isinstance(v, int) else v[0]


def check_streamable(model: nn.Module) -> None:
    """Reject plain torch layers that would silently look into the future or change the rate."""
    for path, m in model.named_modules():
        where = path or type(model).__name__
        if isinstance(m, nn.Conv3d):
            kt, st = m.kernel_size[0], m.stride[0]
            # padding "same" or "valid" pads time by nothing when the temporal kernel is 1 (a per-frame conv);
            # indexed as a sequence, "same" read as padding 's' in the refusal
            pt = m.padding if isinstance(m.padding, str) else _temporal(m.padding)
            if kt != 1 or st != 1 or pt not in (0, None, "same", "valid"):
                what = repr(pt) if isinstance(pt, str) else pt
                raise UnsupportedModelError(
                    f"{where}: torch.nn.Conv3d with temporal kernel {kt}, stride {st}, padding {what} is "
                    "not causal; replace it with edge3d.nn.CausalConv3d (temporal stride 1)."
                )
        elif isinstance(m, (nn.MaxPool3d, nn.AvgPool3d)):
            kt, st = _temporal(m.kernel_size), _temporal(m.stride)
            if kt != 1 or st not in (1, None):
                raise UnsupportedModelError(
                    f"{where}: {type(m).__name__} pools over time (kernel {kt}, stride {st}), which "
                    "needs future frames or changes the frame rate; pool spatially only, kernel (1, k, k)."
                )
        elif isinstance(m, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)):
            out = m.output_size
            if not (isinstance(out, tuple) and out[0] is None):
                raise UnsupportedModelError(
                    f"{where}: {type(m).__name__} averages over the whole clip, which needs future "
                    "frames; use edge3d.nn.RunningMean for a causal average over time."
                )
        elif isinstance(m, nn.RNNBase):
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            if not isinstance(model.get_submodule(parent), _CellHead):
                raise UnsupportedModelError(
                    f"{where}: a bare torch.nn.{type(m).__name__} carries hidden state the step "
                    "function cannot see; use edge3d.nn.LSTMHead / GRUHead."
                )


def collect_specs(model: nn.Module, names: dict[nn.Module, str], ctx: StepContext, sees_frame: bool = True
                  ) -> tuple[list[StreamingModule], list[int], list[StateSpec]]:
    """The stateful layers a discovery run met, in module order, with their named state specs.

    Layers fed the raw frame keep "input history" (frames, not intermediate features), which the
    D3D paper counts separately from the cache; ``sees_frame=False`` where no input is a frame.
    """
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    layers, counts, specs = [], [], []
    for m in sorted(ctx.specs, key=order.__getitem__):
        own = ctx.specs[m]
        if not own:
            continue
        path = names[m]
        layers.append(m)
        counts.append(len(own))
        specs += [s.renamed(f"{path}.{s.name}", path, sees_frame and m in ctx.saw_frame) for s in own]
    return layers, counts, specs


class StepModule(nn.Module):
    """``forward(frame, *states) -> (output, *new_states)``: one frame of a streaming model.

    ``frame`` is (N, C, H, W); ``output`` is the model's clip output for that frame with the
    time axis removed. States are passed in and returned, never stored, so the module exports
    to one graph and N streams are simply a batch of N.
    """

    def __init__(
        self,
        model: nn.Module,
        frame_shape: Sequence[int],
        keep_time: bool | None = None,
        lower: bool = True,
        output_time_axis: int = 2,
    ) -> None:
        super().__init__()
        check_streamable(model)
        model.eval()
        self.model = model
        self.frame_shape = tuple(int(v) for v in frame_shape)
        if keep_time is None:
            keep_time = not getattr(model, "steps_without_time_axis", False)
        self.keep_time, self.lower, self.output_time_axis = keep_time, lower, output_time_axis
        self._names = {m: (p or type(model).__name__) for p, m in model.named_modules()}
        self._discover()

    def _discover(self) -> None:
        ctx = StepContext(None, self.keep_time, self.lower, self._names)
        frame = torch.zeros(1, *self.frame_shape)
        ctx.frame = frame.unsqueeze(2) if self.keep_time else frame
        with torch.no_grad(), stepping(ctx):
            try:
                out = self.model(ctx.frame)
            except RuntimeError as e:
                if ctx.new_states:  # a streaming layer ran: the fault is inside the model, not its input
                    raise
                raise frame_shape_error(self.model, self.frame_shape, str(e)) from e
        self._check_output(out)
        self._layers, self._counts, self._specs = collect_specs(self.model, self._names, ctx)

    def _check_output(self, out: object) -> None:
        name = type(self.model).__name__
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"{name}: forward must return one tensor to be streamed, got "
                                        f"{type(out).__name__}; {ONE_OUTPUT_FIX}.")
        axis = self.output_time_axis
        # the step runs forward on a one-frame clip: its output's time axis must be there, with one frame
        if self.keep_time and out.dim() <= axis:
            raise UnsupportedModelError(
                f"{name}'s forward returns shape {tuple(out.shape)}, with no time axis, and edge3d streams one output "
                "per frame, (N, classes, T): an output per clip, pooled over time, cannot stream; pool with "
                "edge3d.nn.RunningMean (a causal mean) and keep the time axis."
            )
        if self.keep_time and out.shape[axis] != 1:
            raise UnsupportedModelError(
                f"{name}'s forward returns shape {tuple(out.shape)} for a one-frame clip, so axis {axis} is not its "
                "time axis; return one output per frame as (N, classes, T) (transpose an (N, T, classes) output)."
            )

    @property
    def state_specs(self) -> list[StateSpec]:
        return list(self._specs)

    def initial_states(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        if not is_positive_int(batch):  # True is an int to Python; the runtime refuses it too
            raise ValueError(f"batch must be a positive number of streams, got {batch!r}.")
        return tuple(s.initial(batch) for s in self._specs)

    def forward(self, frame: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if frame.dim() != 4 or tuple(frame.shape[1:]) != self.frame_shape:
            raise ValueError(f"frame has shape {tuple(frame.shape)}; this step takes (N, "
                             f"{', '.join(map(str, self.frame_shape))}), the frame_shape given to to_step.")
        if len(states) != len(self._specs):
            raise ValueError(
                f"step expects {len(self._specs)} state tensors after the frame, got {len(states)}; "
                "start from initial_states()."
            )
        by_layer: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        i = 0
        for m, n in zip(self._layers, self._counts, strict=True):
            by_layer[m] = tuple(states[i:i + n])
            i += n
        ctx = StepContext(by_layer, self.keep_time, self.lower, self._names)
        with stepping(ctx):
            out = self.model(frame.unsqueeze(2) if self.keep_time else frame)
        self._check_output(out)
        if self.keep_time:
            out = out.select(self.output_time_axis, 0)
        new = [ctx.new_states.get(m, by_layer[m]) for m in self._layers]
        return (out, *[t for group in new for t in group])


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Give each module back the train/eval mode it had, once the block is done.

    The step needs eval mode (batch statistics over time are not causal), but ``export_artifact``
    and ``inspect`` take a model from a notebook, often mid-training: leaving it in eval mode let
    training go on with frozen BatchNorm statistics and no dropout, without a word. Each module is
    restored, not the root's flag: a model may keep some BatchNorms frozen while it trains.
    """
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []  # refused later
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: torch.compile's ``OptimizedModule`` (its compiled forward failed in
    Inductor on the step check's clip, and its attributes such as ``frame_mean`` are the model's) and
    ``DataParallel`` / ``DistributedDataParallel`` (whose attributes are not). A model trained under
    either is exported as the model itself; its weights are the same tensors."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def to_step(
    model: nn.Module,
    frame_shape: Sequence[int] = (3, 112, 112),
    keep_time: bool | None = None,
    lower: bool = True,
    output_time_axis: int = 2,
) -> StepModule:
    """Wrap ``model`` (clip mode, causal) as a :class:`StepModule` for frames of ``frame_shape``.

    ``keep_time`` (default: unless the model declares ``steps_without_time_axis = True``) feeds
    the model one-frame clips, so forward code written for (N, C, T, H, W) tensors still works.
    ``lower=False`` keeps causal convs as Conv3d over the cache (the naive form, for benchmarks).
    The model is switched to eval mode: batch statistics over time would not be causal.

    A model that changes its frame rate (temporal strides, similarity-guided sampling) gets a
    :class:`edge3d.staged.StagedStepModule` instead: one pure step function per rate.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_step needs a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap(model)
    if len(frame_shape) != 3 or not all(is_positive_int(v) for v in frame_shape):
        raise ValueError(f"frame_shape must be (C, H, W) with positive sizes, got {tuple(frame_shape)}; "
                         "e.g. (3, 112, 112).")
    check_float32_cpu(model)
    from .staged import is_multirate

    if is_multirate(model):
        check_streamable(model)
        from .nn.sgs import SimilarityGuidedSampling

        if any(isinstance(m, SimilarityGuidedSampling) for m in model.modules()):
            from .staged_sgs import SGSStagedStepModule

            return SGSStagedStepModule(model, frame_shape, lower)  # type: ignore[return-value]
        from .staged import StagedStepModule

        return StagedStepModule(model, frame_shape, keep_time, lower)  # type: ignore[return-value]
    return StepModule(model, frame_shape, keep_time, lower, output_time_axis)


def check_float32_cpu(model: nn.Module) -> None:
    """Refuse weights the step cannot run as they are, before a first frame fails on them.

    edge3d feeds float32 CPU frames (the check and the export trace on the CPU, and FP16/INT8 are
    built later from the float32 graph), so a model left in float64, float16 or on a GPU after
    training used to fail inside its first conv with a message that blamed the frame shape.
    """
    from torch.nn.parameter import is_lazy

    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if is_lazy(t):
            continue
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(f"{type(model).__name__}'s {name} is {str(t.dtype).removeprefix('torch.')}; edge3d "
                             "streams and exports float32 models (FP16 and INT8 are built from the float32 graph "
                             "by a precision profile), so call model.float() first.")
        if t.device.type == "meta":
            raise ValueError(f"{type(model).__name__}'s {name} is on the meta device, which holds no values; "
                             "build the model on the CPU or load its weights (model.to_empty(device='cpu') then "
                             "load_state_dict) first.")
        if t.device.type != "cpu":
            raise ValueError(f"{type(model).__name__}'s {name} is on {t.device}; edge3d checks and exports the "
                             "model on the CPU (the exported graph runs on any device), so call model.cpu() first.")


def frame_shape_error(model: nn.Module, frame_shape: Sequence[int], detail: str) -> ValueError:
    """The model failed on its very first layers: the frame shape, not the model, is what to fix."""
    first = detail.strip().splitlines()[0] if detail.strip() else "it failed"
    return ValueError(f"{type(model).__name__} cannot run on frames of shape {tuple(frame_shape)} ({first}); "
                      "edge3d calls the model on (N, C, T, H, W) clips of such frames, so pass the (C, H, W) it "
                      "takes: its input channels, and a size its downsampling allows (--channels and --size "
                      "on the command line).")
