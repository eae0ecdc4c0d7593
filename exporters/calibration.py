"""INT8 calibration data from rollouts: the FP32 artifact streamed over real frames.

A step graph's inputs are a frame *and* the states. Random or zero states would calibrate the
state tensors on values they never take in a stream, so the reader runs the FP32 graph with
:class:`edge3d.runtime.Session` and yields, per frame after a warm-up, the feed the graph
really sees: the frame plus ``session.get_state()`` taken *before* that step. A multi-rate
artifact is calibrated one stage graph at a time, on the feeds that stage really gets (its input
buffers, filled by the stages before it, and its own states) whenever the FP32 rollout runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import Session
from ..runtime.manifest import BUFFER_IN, output_period, state_io_names
from ..sources import split_item, streams_of

_SAMPLE = 4096  # values of each state kept per calibration feed for percentile ranges
# how the messages name the option, for the CLI user and for the notebook user of add_precisions alike
CALIB_SOURCE = "--calib-source (calib_source= in Python)"



def default_calib_source() -> str:
    """The synthetic gesture stream where it is installed; otherwise ask for a source."""
    from ..sources import synthetic_available

    if synthetic_available():
        return "synthetic"
    raise ValueError("INT8 calibration needs frames and the synthetic source is not available here; "
                     f"pass a video or a folder of them as {CALIB_SOURCE}.")


class RolloutReader:
    """An ONNX Runtime ``CalibrationDataReader`` over FP32 rollouts.

    ``get_next()`` steps the FP32 session one frame at a time and returns
    ``{"frame": (1, C, H, W), "state_in.<name>": state before the step, ...}`` for ``frames``
    steps after the first ``warmup`` steps of each stream (states start at zero, which is not
    what a running stream looks like). Several streams (a folder of videos) each start from the
    initial state, and each gives an equal share of the frames still wanted (a short clip's
    shortfall goes to the clips after it): taken in order, the first clips alone filled the 256
    frames, and a folder sorted by class calibrated on its first class. It also keeps per-state
    statistics: the absolute values seen (to scale int8 state storage) and how many yielded
    feeds had a non-zero state.

    ``stage`` (a multi-rate artifact): yield stage ``stage``'s feeds instead, one each time the
    rollout runs that stage; ``frames`` still counts the frames stepped after warm-up, so a stage run
    every 4 frames is calibrated on a quarter as many feeds, from the same stretch of video. Each
    stream's share is then a whole number of cycles (the slowest stage's rate P): any P frames in a
    row run every stage, where a folder of 101 clips sharing 256 frames gave each clip 2 or 3, which
    never reached a stride-8 stage's first run.

    ``images_fps``: the rate the source's folders of images were extracted at, so that they are paced
    to the artifact's frame rate as videos are.
    """

    def __init__(self, artifact: str | Path, source: str | Iterable[Any], frames: int, warmup: int = 16,
                 progress: Callable[[int], None] | None = None, stage: int | None = None,
                 images_fps: float | None = None) -> None:
        if frames < 1:
            raise ValueError(f"calibration frames must be at least 1, got {frames}.")
        self.session = Session(artifact, profile="fp32", backend="onnxruntime")
        self.manifest = self.session.manifest
        self.frames, self.warmup, self.progress = frames, warmup, progress
        # frames at the rate the model takes them: its states' ranges depend on the motion per frame
        self.description, streams = streams_of(source, int(self.manifest["frame"]["height"]),
                                               fps=self.manifest["frame"].get("fps"), images_fps=images_fps)
        self.images_fps = images_fps
        self._streams = list(streams)  # (name, lazy frames) pairs: nothing is opened before its turn
        self._current: Iterator[Any] | None = None
        self._t = 0
        self._quota = 0  # the feeds the current stream may still give
        self.stream_count = 0
        self.frames_read = 0
        self.yielded = 0
        self.nonzero_state_feeds = 0
        self.feeds = 0  # feeds yielded: the frames past warm-up, or a stage's runs among them
        self.stage = stage
        self._cycle = 1 if stage is None else output_period(self.manifest)  # frames per share unit
        # the feed each state (and each buffer a stage reads from the one before) arrives in
        self._fed = {s["name"]: s["input"] for s in self.manifest["states"]}
        self.buffer_names: list[str] = []
        if stage is None:
            self.state_names = [s["name"] for s in self.manifest["states"]]
        else:
            self.state_names = list(self.manifest["stages"][stage]["states"])
            self.buffer_names = [i["name"] for i in self.manifest["stages"][stage]["inputs"]
                                 if i["name"].startswith(BUFFER_IN)]
            self._fed.update({b: b for b in self.buffer_names})
            self.session.keep_feeds = True
        # |state| statistics with bounded memory: the exact maximum and a fixed-size sample per feed.
        self.state_max: dict[str, float] = {n: 0.0 for n in self.state_names + self.buffer_names}
        self.state_abs: dict[str, list[np.ndarray]] = {n: [] for n in self.state_max}
        self._rng = np.random.default_rng(0)
        self._buf = np.empty(self.session.pre.shape, np.float32)
        self._pending: dict[str, np.ndarray] | None = None

    def prime(self) -> None:
        """Read up to the first feed now, so an empty source fails before quantisation starts."""
        if self._pending is None and self.yielded == 0:
            self._pending = self._advance()
            if self._pending is None and self.yielded:  # frames past warm-up, none of them ran this stage
                rate = self.manifest["stages"][self.stage]["rate"]
                raise ValueError(
                    f"calibration source {self.description!r} gave {self.yielded} frames after the {self.warmup} "
                    f"warm-up frames of each stream, and stage {self.stage}, which runs once every {rate} frames of "
                    f"a stream, ran on none of them; pass clips of at least {self.warmup + rate} frames, or "
                    f"synthetic, as {CALIB_SOURCE}."
                )
            if self._pending is None:
                raise ValueError(
                    f"calibration source {self.description!r} gave no frames after the {self.warmup} warm-up "
                    f"frames of each stream; pass a longer video, a folder of videos or synthetic as {CALIB_SOURCE}."
                )

    def _next_frame(self) -> np.ndarray | None:
        while True:
            if self._current is not None and self._quota <= 0:  # its share given: on to the next stream
                self._current = None
            if self._current is None:
                if self.stream_count >= len(self._streams):
                    return None
                _, frames = self._streams[self.stream_count]
                self._current = iter(frames)
                self.session.reset()
                self._t = 0
                left = len(self._streams) - self.stream_count
                self._quota = -(-(self.frames - self.yielded) // left)  # ceil: the last stream takes what is left
                self._quota = -(-self._quota // self._cycle) * self._cycle  # whole cycles of the stages
                self.stream_count += 1
            try:
                item = next(self._current)
            except StopIteration:
                self._current = None
                continue
            frame, _ = split_item(item)
            self.session.pre(np.asarray(frame), self._buf)
            self.frames_read += 1
            return self._buf

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pending is not None:
            feed, self._pending = self._pending, None
            return feed
        return self._advance()

    def _advance(self) -> dict[str, np.ndarray] | None:
        while self.yielded < self.frames:
            x = self._next_frame()
            if x is None:
                return None
            t = self._t
            self._t += 1
            if t < self.warmup:
                self.session.step(x)
                continue
            if self.stage is None:
                states = self.session.get_state()
                self.session.step(x)
                feed: dict[str, np.ndarray] | None = {
                    "frame": x[None].copy(), **{state_io_names(n)[0]: states[n] for n in self.state_names}}
            else:
                self.session.step(x)
                feed = next((f for k, f in self.session.last_feeds if k == self.stage), None)
            self.yielded += 1
            self._quota -= 1
            if self.progress is not None:
                self.progress(1)
            if feed is None:  # this stage did not run on this frame
                continue
            for name in self.state_max:
                a = np.abs(feed[self._fed[name]]).reshape(-1)
                self.state_max[name] = max(self.state_max[name], float(a.max(initial=0.0)))
                if a.size > _SAMPLE:
                    a = a[self._rng.integers(0, a.size, _SAMPLE)]
                self.state_abs[name].append(a)
            if any(np.any(feed[state_io_names(n)[0]]) for n in self.state_names):
                self.nonzero_state_feeds += 1
            self.feeds += 1
            return feed
        return None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (feed := self.get_next()) is not None:
            yield feed

    def rewind(self) -> None:  # pragma: no cover - ORT calibrators read once
        raise RuntimeError("a rollout reader is read once; create a new one to calibrate again.")

    def state_range(self, name: str, method: str, percentile: float = 99.999) -> float:
        """Largest magnitude of a state to map to int8: max (minmax) or a percentile of |x|.

        Entropy calibration, which ORT applies to activations, is approximated for state storage
        by the percentile: both clip rare outliers to keep resolution for typical values.
        """
        if method == "minmax" or not self.state_abs[name]:
            return self.state_max[name]
        return float(np.percentile(np.concatenate(self.state_abs[name]), percentile))

    def info(self) -> dict[str, Any]:
        return {"frames": self.yielded, "frames_requested": self.frames, "warmup": self.warmup,
                "source": self.description, **({"images_fps": self.images_fps} if self.images_fps else {}),
                "streams": self.stream_count, "frames_read": self.frames_read,
                "nonzero_state_feeds": self.nonzero_state_feeds}

    def close(self) -> None:
        self.session.close()


def check_calib_source(source: str | Path, model_size: int = 112) -> None:
    """Open a calibration source and read one frame, so a bad source fails before a slow export."""
    description, streams = streams_of(source, model_size)
    for _, frames in streams:
        for _ in frames:
            return
    raise ValueError(f"calibration source {description!r} gave no frames; pass a video, a folder of videos "
                     f"or synthetic as {CALIB_SOURCE}.")
