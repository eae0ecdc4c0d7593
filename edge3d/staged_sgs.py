"""Fixed-shape, exportable streaming form of a model with similarity-guided sampling.

Stage 0 is the causal part before SGS, stepped every frame (an ordinary step module); its
per-frame features fill a K-frame buffer. Stage 1 runs every K frames on that buffer:
SGS weights Ψ (K, B), the occupancy mask, and a compaction matrix P (B, B) that moves the B'
occupied bins to the front (:func:`edge3d.nn.sgs.compaction`). The layers after SGS then run
over the B compacted bins from their initial state, all bins in one batch (:class:`_BinsAsBatch`),
or stepped bin by bin, unrolled in the graph, where a layer needs that: because they are
causal, positions 0..B'−1 equal the dynamic reference that runs them on the B' bins alone,
whatever sits in the B−B' zero rows behind. The temporal pooling is a masked mean over the
first B' positions. So the exported graph equals the dynamic PyTorch reference, with fixed
shapes, and it also outputs ``bins_used`` = B' per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .convert import StepModule
from .nn.conv import CausalConv3d
from .nn.sgs import compaction
from .nn.state import StateSpec, StepContext, stepping
from .runtime.manifest import buffer_io_names
from .staged import BufferSpec, Stage, StagedStepModule


class _ByPath(StepContext):
    """Step context keyed by module path instead of module object.

    torch.export's non-strict tracing can present the stage's submodules as other objects than
    the ones seen at construction, so states carried between the unrolled bin steps are keyed
    by a path tag set on each module.
    """

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        key = module._edge3d_path
        if self.discover:
            specs = module.state_specs(tuple(x.shape[1:]))
            state = tuple(sp.initial(x.shape[0], x.device) for sp in specs)
        else:
            state = self.states.get(key, ())  # type: ignore[call-overload]
        y, new = module._step_in_context(x, state, self)
        self.new_states[key] = tuple(new)  # type: ignore[index]
        return y


class _NeedsUnrolling(Exception):
    """A post-SGS layer that the bins-as-batch form cannot run: step the bins one by one instead."""


class _BinsAsBatch(StepContext):
    """Runs the post-SGS layers over all B bins of a chunk in one call, the bins folded into the batch
    axis (row n·B + j is bin j of stream n).

    Stepped bin by bin, each of the B unrolled steps ran every conv at batch N, reading all its
    weights again: 8 times per chunk, at 4×4 to 14×14 pixels. Folded, each conv runs once at batch
    N·B. Stateless layers see nothing different; a causal conv over the bins stacks, for each tap,
    the bins shifted by its delay (zeros before bin 0, its initial state) along the channels, and
    runs the 2-D conv the step would. Any other stateful layer raises :class:`_NeedsUnrolling`.
    """

    def __init__(self, bins: int) -> None:
        super().__init__({}, keep_time=False, lower=True)
        self.bins = bins

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not module.state_specs(tuple(x.shape[1:])):  # stateless here (a 1×k×k conv, say): per frame
            return module._step_in_context(x, (), self)[0]
        if not isinstance(module, CausalConv3d) or module.temporal_stride != 1:
            raise _NeedsUnrolling(type(module).__name__)
        kt, dt, h = module.kernel_size[0], module.dilation[0], module.history
        c, hw = x.shape[1], x.shape[2:]
        by_stream = x.reshape(-1, self.bins * c, *hw)  # rank 4: never a rank-5 tensor in the graph

        def delayed(d: int) -> torch.Tensor:  # bin j - d in row j, zeros for j < d
            if d == 0:
                return x
            if d >= self.bins:
                return torch.zeros_like(x)
            return F.pad(by_stream[:, :(self.bins - d) * c], (0, 0, 0, 0, d * c, 0)).reshape(x.shape)

        full = torch.cat([delayed(h - i * dt) for i in range(kt)], dim=1)  # the taps, oldest first
        return module._conv_frames(full, list(range(kt)), c)


class FrameStage(Stage):
    """Stage 0: a single-rate step module whose output feeds a buffer."""

    def __init__(self, step: StepModule, buffer: BufferSpec) -> None:
        super().__init__()
        self.step = step
        self.index, self.period, self.stride = 0, 1, 1
        self.input_names, self.input_shapes = ["frame"], [step.frame_shape]
        self.output_names = [buffer_io_names(buffer.name)[1]]
        self.specs = [s.renamed(f"pre.{s.name}", f"pre.{s.layer}",
                                s.input_history) for s in step.state_specs]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.step(*args)


class SGSChunkStage(Stage):
    """Stage 1: SGS on a K-frame buffer, the post-SGS layers over B compacted bins, the head."""

    def __init__(self, model: nn.Module, buffer: BufferSpec, lower: bool) -> None:
        super().__init__()
        self.model = model
        self.sgs, self.post = model.sgs, model.post
        self.index, self.period, self.stride = 1, buffer.stride, buffer.stride
        self.input_names, self.input_shapes = [buffer_io_names(buffer.name)[0]], [buffer.shape]
        self.output_names = ["output", "bins_used"]
        self.specs: list[StateSpec] = []
        self.lower = lower
        self._names = {m: f"post.{p}" if p else "post" for p, m in self.post.named_modules()}
        for m, path in self._names.items():
            m._edge3d_path = path
        # The bins as one batch where every post-SGS layer allows it (the lowered form only; the naive
        # Conv3d form, kept for benchmarks, steps bin by bin)
        self.batch_bins = lower and self._bins_batch_ok(buffer)

    def _bins_batch_ok(self, buffer: BufferSpec) -> bool:
        c = buffer.shape[0] // self.sgs.chunk
        try:
            with torch.no_grad(), stepping(_BinsAsBatch(self.sgs.bins)):
                self.post(torch.zeros(self.sgs.bins, c, *buffer.shape[1:]))
        except _NeedsUnrolling:
            return False
        return True

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (window,) = args  # var-positional like every stage, so one export path fits all
        K, B = self.sgs.chunk, self.sgs.bins
        n, c = window.shape[0], window.shape[1] // K
        frames = [window[:, t * c:(t + 1) * c] for t in range(K)]
        pooled = torch.stack([f.mean(dim=(-2, -1)) for f in frames], dim=1)  # (N, K, C)
        psi = self.sgs.kernel(pooled)  # (N, K, B)
        mask = self.sgs.occupied(psi)
        weights = torch.matmul(compaction(mask), psi.transpose(1, 2))  # (N, B, K), occupied bins first
        flat = window.reshape(n, K, -1)  # rank 3: never a rank-5 tensor in the graph
        compact = torch.matmul(weights, flat)  # (N, B, C·H·W)
        used = mask.to(window.dtype).sum(dim=1)  # B' >= 1 always (see edge3d.nn.sgs)
        if self.batch_bins:
            with stepping(_BinsAsBatch(B)):
                y = self.post(compact.reshape(n * B, c, *window.shape[2:]))
            f = self.model.pool_features(y)
            f = f.reshape(n, B, -1) * (torch.arange(B, dtype=used.dtype) < used.unsqueeze(1)).unsqueeze(2)
            return self.model.classify(f.sum(dim=1) / used.unsqueeze(1)), used.to(torch.int64)
        states: dict[str, tuple[torch.Tensor, ...]] | None = None
        total = None
        for j in range(B):
            ctx = _ByPath(states, keep_time=False, lower=self.lower)  # type: ignore[arg-type]
            with stepping(ctx):
                y = self.post(compact[:, j].reshape(n, c, *window.shape[2:]))
            states = dict(ctx.new_states)  # type: ignore[arg-type]
            f = self.model.pool_features(y) * (used > j).to(y.dtype).unsqueeze(1)
            total = f if total is None else total + f
        feat = total / used.unsqueeze(1)
        return self.model.classify(feat), used.to(torch.int64)


class SGSStagedStepModule(StagedStepModule):
    """Two stages: frames -> pre-SGS features (every frame), SGS chunk -> logits (every K frames)."""

    def __init__(self, model: nn.Module, frame_shape: Sequence[int], lower: bool = True) -> None:
        nn.Module.__init__(self)
        model.eval()
        self.model = model
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.keep_time, self.lower = False, lower
        pre = StepModule(model.pre, self.frame_shape, keep_time=False, lower=lower)
        with torch.no_grad():
            feat = pre(torch.zeros(1, *self.frame_shape), *pre.initial_states(1))[0]
        K = model.sgs.chunk
        buf = BufferSpec("sgs", tuple(feat.shape[1:]), K, 0, 1, ("sgs",))
        self.buffers = [buf]
        self.periods = [1, K]
        self.stages = nn.ModuleList([FrameStage(pre, buf), SGSChunkStage(model, buf, lower)])

    def report(self) -> dict[str, Any]:
        r = super().report()
        r["sgs"] = {"chunk": self.model.sgs.chunk, "bins": self.model.sgs.bins, "embed_dim": self.model.sgs.embed_dim}
        return r
