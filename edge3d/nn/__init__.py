"""Causal streaming layers: each works on clips (N, C, T, ...) and steps frame by frame.

See :mod:`edge3d.nn.state` for how a model's ordinary forward becomes a pure step function.
"""

from .conv import CausalConv3d, CausalTemporalAggregation
from .delay import FrameHistory, TemporalShift
from .pooling import BatchNorm3d, RunningMean, SpatialMaxPool3d, spatial_mean
from .rate import CausalTemporalPool
from .rnn import GRUHead, LSTMHead, RecurrentConv
from .state import StateSpec, StepContext, StreamingModule, current_context, stepping

__all__ = [
    "BatchNorm3d",
    "CausalConv3d",
    "CausalTemporalAggregation",
    "CausalTemporalPool",
    "FrameHistory",
    "GRUHead",
    "LSTMHead",
    "RecurrentConv",
    "RunningMean",
    "SpatialMaxPool3d",
    "StateSpec",
    "StepContext",
    "StreamingModule",
    "TemporalShift",
    "current_context",
    "spatial_mean",
    "stepping",
]
