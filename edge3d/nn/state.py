"""State specs and the step context that turns clip-mode forward code into a pure step function.

Every streaming layer owns a bounded summary of the past (its *state*). To make a whole network
one pure function ``step(frame, *states) -> (output, *new_states)``, :class:`StepContext` is
installed for the duration of a single call: each streaming layer, when the model's ordinary
forward reaches it, reads its state from the context and writes the new state back. Nothing
survives the call on the modules themselves, so the same module traces into one graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

KINDS = ("ring", "recurrent", "accumulator")


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of one layer: enough to allocate, name, export and account for it.

    ``shape`` excludes the batch (stream) axis, which always comes first at run time.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    init: float = 0.0
    kind: str = "ring"
    layer: str = ""
    input_history: bool = False
    doc: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"state kind {self.kind!r} is not one of {KINDS}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        """Bytes per stream."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def initial(self, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.full((batch, *self.shape), self.init, dtype=self.dtype, device=device)

    def renamed(self, name: str, layer: str, input_history: bool) -> StateSpec:
        return StateSpec(name, self.shape, self.dtype, self.init, self.kind, layer, input_history, self.doc)


class StepContext:
    """Carries states into and out of one step call of a whole model.

    ``keep_time``: the model's forward sees a one-frame clip (N, C, 1, ...) instead of a frame
    (N, C, ...). Models written for clip tensors need it; the zoo models do not.
    ``lower``: causal convs run as 2D convs over channel-stacked caches (False: naive Conv3d).
    ``discover``: no states are given; layers start from their initial state and record specs.
    """

    def __init__(
        self,
        states: dict[nn.Module, tuple[torch.Tensor, ...]] | None,
        keep_time: bool,
        lower: bool = True,
        names: dict[nn.Module, str] | None = None,
    ) -> None:
        self.states = states
        self.keep_time = keep_time
        self.lower = lower
        self.names = names or {}
        self.new_states: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        self.specs: dict[nn.Module, list[StateSpec]] = {}
        self.order: list[nn.Module] = []
        self.frame: torch.Tensor | None = None
        self.saw_frame: set[nn.Module] = set()

    @property
    def discover(self) -> bool:
        return self.states is None

    def name_of(self, module: nn.Module) -> str:
        return self.names.get(module, type(module).__name__)

    def run(self, module: StreamingModule, x: torch.Tensor) -> torch.Tensor:
        if module in self.new_states:
            raise ValueError(
                f"{self.name_of(module)}: a streaming layer was called twice in one step; "
                "give each call site its own layer instance."
            )
        if self.keep_time:
            if x.dim() < 3 or x.shape[2] != 1:
                raise ValueError(
                    f"{self.name_of(module)}: expected a one-frame clip (N, C, 1, ...) in step mode, "
                    f"got shape {tuple(x.shape)}; keep the time axis at dim 2."
                )
        frame_shape = tuple(x.shape[1:2]) + tuple(x.shape[3:] if self.keep_time else x.shape[2:])
        if self.frame is not None and x is self.frame:
            self.saw_frame.add(module)
        if self.discover:
            specs = module.state_specs(frame_shape)
            self.specs[module] = specs
            state = tuple(s.initial(x.shape[0], x.device) for s in specs)
        else:
            state = self.states.get(module, ())
        y, new_state = module._step_in_context(x, state, self)
        self.new_states[module] = tuple(new_state)
        self.order.append(module)
        return y


_ACTIVE: list[StepContext] = []


def current_context() -> StepContext | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def stepping(ctx: StepContext) -> Iterator[StepContext]:
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()


class StreamingModule(nn.Module):
    """Base of every layer with temporal state.

    Subclasses implement ``forward_clip`` on (N, C, T, ...) clips, causal and T-preserving, and
    ``forward_step`` on one frame (N, C, ...) as a pure function of (frame, *state). The initial
    state (zeros unless a spec says otherwise) must reproduce clip mode's zero temporal padding.
    """

    #: frames of input an output depends on, the current one included (1 = only the current frame,
    #: 0 = unbounded: a recurrence or a running statistic depends on every frame so far)
    receptive_field: int = 1
    #: frames of output latency; causal layers have none
    delay: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = current_context()
        if ctx is None:
            return self.forward_clip(x)
        return ctx.run(self, x)

    def forward_clip(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_step(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[Any, ...]:  # pragma: no cover
        raise NotImplementedError

    def state_specs(self, frame_shape: tuple[int, ...]) -> list[StateSpec]:
        """Specs of this layer's states for a step input of ``frame_shape`` (no batch axis)."""
        return []

    def initial_states(self, frame_shape: tuple[int, ...], batch: int = 1) -> tuple[torch.Tensor, ...]:
        return tuple(s.initial(batch) for s in self.state_specs(frame_shape))

    def _step_in_context(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...], ctx: StepContext
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if ctx.keep_time:
            x = x.select(2, 0)
        y, *new_state = self.forward_step(x, *state)
        if ctx.keep_time:
            y = y.unsqueeze(2)
        return y, tuple(new_state)
