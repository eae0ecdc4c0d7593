"""The small contract every backend implements (activate on construction, infer, deactivate)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Backend:
    """Steps N streams; owns one set of state buffers per stream on its device.

    The Session validates and preprocesses input before calling a backend, so backends may
    assume well-formed frames. A backend must leave every state untouched if a call raises.
    """

    name = "base"

    def __init__(self, manifest: dict[str, Any], profile: str, streams: int) -> None:
        self.manifest, self.profile, self.streams = manifest, profile, streams

    @property
    def frame_buffer(self) -> np.ndarray:
        """Host staging buffer (streams, C, H, W) the Session preprocesses frames into."""
        raise NotImplementedError

    def subset_frame_buffer(self, k: int) -> np.ndarray:
        """Staging buffer for a call that steps ``k`` of the streams."""
        raise NotImplementedError

    def step_all(self, frames: np.ndarray) -> np.ndarray:
        """Step every stream once (frames: (streams, C, H, W)); returns (streams, *output)."""
        raise NotImplementedError

    def step_rows(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Step only the streams in ``rows`` (unique, sorted or not)."""
        raise NotImplementedError

    def reset_rows(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def read_states(self) -> dict[str, np.ndarray]:
        """Host copies of every state, (streams, ...) each."""
        raise NotImplementedError

    def write_states(self, states: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def state_dtypes(self) -> dict[str, np.dtype]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
