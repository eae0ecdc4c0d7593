"""Synthetic gesture streams in which only motion tells the class.

The point of this source is to check that a causal video network really uses time: every
class draws its object appearance, position, orientation and size from the same
distribution, so one frame carries (almost) no information about the label, while a few
frames of motion identify it unambiguously. Design choices that follow from that:

* The image is a torus for the object: a swipe that leaves on one side re-enters on the
  other. Positions are therefore uniform for every class at every frame, and a swipe can
  last as long as the gesture does at a clearly visible speed.
* Every object carries an off-centre marker and is itself asymmetric, so a rotation is
  visible and the shape says nothing about which class is playing.
* Approach and recede are time-reversed twins (their per-frame size distributions are
  identical), and their length is capped so the zoom stays strong without leaving the
  size range.
* Between gestures the object rests, then re-appears at a new pose during every gap (and
  rests there for at least 5 frames). The re-appearance happens before every gesture, so
  its presence says nothing about what follows. The pose it lands in is drawn for the coming
  gesture; position and orientation are uniform, but a zoom needs room, so an object about
  to approach is smaller than average and one about to recede larger. That is the one known
  leak: from the rest size alone the best guess of the next class is right ~29% of the time
  (chance 12.5%), and only for approach/recede; it never labels a frame by itself.
* A background distractor, if a stream has one, is present for the whole stream, so it
  cannot mark "no gesture" frames.

Everything is numpy and deterministic given the seed. The stream is produced chunk by
chunk from two generators (one plans segments, one draws per-frame noise), so the frames
do not depend on the chunk size; ``make_stream`` and ``iter_stream`` share that code.
Drawing touches only the pixels near the object, and the camera noise is a sum of four
uniform bytes (near-Gaussian, bounded at 3.5 sigma) because ``standard_normal`` alone
would take most of the time; 2,000 frames at 112x112 take about a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "classes",
    "SEGMENT_FRAMES",
    "make_clip",
    "make_stream",
    "make_background",
    "iter_stream",
    "gesture_segments",
    "parse_source",
]

classes: list[str] = [
    "no_gesture",
    "swipe_left",
    "swipe_right",
    "swipe_up",
    "swipe_down",
    "rotate_cw",
    "rotate_ccw",
    "approach",
    "recede",
]

NO_GESTURE = 0
_SWIPES = {1: (-1.0, 0.0), 2: (1.0, 0.0), 3: (0.0, -1.0), 4: (0.0, 1.0)}  # image y points down
_ROTATE_CW, _ROTATE_CCW, _APPROACH, _RECEDE = 5, 6, 7, 8

# Inclusive length ranges (frames) of segments in a stream. "no_gesture" is the gap between
# two gestures. Zoom gestures are shorter so that a clearly visible rate fits the size range.
SEGMENT_FRAMES: dict[str, tuple[int, int]] = {
    name: (8, 24) if i == NO_GESTURE else (16, 22) if i in (_APPROACH, _RECEDE) else (16, 40)
    for i, name in enumerate(classes)
}

# Motion and appearance parameters, in pixels of a 112-pixel frame (scaled with frame size).
_REF_SIZE = 112.0
_RADIUS = (8.0, 36.0)  # object radius (its extent in local units is <= 1)
_SWIPE_SPEED = (2.5, 4.5)  # px / frame
_SWIPE_SKEW_DEG = 15.0  # off-axis wobble of a swipe's direction
_ROT_SPEED_DEG = (12.0, 20.0)  # deg / frame: slower turns of small objects are sub-pixel at 48 px
_ZOOM_RATE = (0.05, 0.07)  # log-radius change / frame
_ZOOM_MAX_LOG = 1.1  # most log-radius change in one gesture (x3), so still >= 5 %/frame
# Hand tremor at rest: half of the rests are still, the others jitter by up to 0.5 px per axis
# (|offset| <= 0.71 px). Gestures move cleanly, so tremor never masks a slow zoom.
_JITTER_STILL = (0.2, 0.5)
_NOISE_SIGMA = (3.0, 6.0)
_REAPPEAR_NEW_OBJECT = 0.5  # chance that a re-appearing object also changes shape/colour
_MIN_CONTRAST = 80.0  # RGB distance between object and every sampled background colour
_MARKER_CONTRAST = 100.0


# --------------------------------------------------------------------------- appearance


@dataclass(frozen=True)
class _Appearance:
    sdf: Callable[[np.ndarray, np.ndarray], np.ndarray]  # signed distance in local units
    colour: np.ndarray  # float32 [3]
    marker: tuple[float, float, float]  # (u, v, radius) in local units
    marker_colour: np.ndarray


def _box(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hu: float, hv: float) -> np.ndarray:
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _sample_shape(rng: np.random.Generator) -> tuple[Callable, tuple[float, float, float]]:
    """Pick a shape whose extent stays inside the unit disc, so the radius means the same for all."""
    kind = int(rng.integers(5))
    mr = float(rng.uniform(0.2, 0.25))
    if kind == 0:  # ellipse; distance ~ (k - 1) / |grad k|
        b = float(rng.uniform(0.45, 0.7))

        def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            k = np.sqrt(u * u + (v * v) / (b * b)) + 1e-6
            grad = np.sqrt(u * u + (v * v) / b**4) / k + 1e-6
            return (k - 1.0) / grad

        return sdf, (0.5, 0.35 * b, mr)
    if kind == 1:  # rectangle
        a, b = float(rng.uniform(0.85, 0.95)), float(rng.uniform(0.35, 0.6))
        return (lambda u, v: _box(u, v, 0.0, 0.0, a, b)), (0.55 * a, 0.45 * b, mr)
    if kind == 2:  # scalene triangle: max over edges of the signed distance to each edge line
        pts = np.array([[0.95, 0.0], [-0.6, 0.72], [-0.55, -0.5]]) + rng.uniform(-0.06, 0.06, (3, 2))
        normals, offsets = [], []
        for i in range(3):
            p, q = pts[i], pts[(i + 1) % 3]
            n = np.array([q[1] - p[1], p[0] - q[0]])
            n /= np.linalg.norm(n)
            if n @ (pts[(i + 2) % 3] - p) > 0:  # point the normal outwards
                n = -n
            normals.append(n)
            offsets.append(float(n @ p))

        def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            out = normals[0][0] * u + normals[0][1] * v - offsets[0]
            for n, d in zip(normals[1:], offsets[1:], strict=True):
                out = np.maximum(out, n[0] * u + n[1] * v - d)
            return out

        return sdf, (0.1, 0.05, mr)
    if kind == 3:  # cross with an off-centre vertical bar
        w, shift = float(rng.uniform(0.2, 0.28)), float(rng.uniform(0.2, 0.35))
        return (
            lambda u, v: np.minimum(_box(u, v, 0.0, 0.0, 0.92, w), _box(u, v, shift, 0.0, w, 0.68)),
            (-0.6, 0.0, min(mr, w)),
        )
    w = float(rng.uniform(0.24, 0.32))  # L shape
    return (
        lambda u, v: np.minimum(_box(u, v, 0.0, 0.7 - w, 0.7, w), _box(u, v, -0.7 + w, 0.0, w, 0.7)),
        (0.45, 0.7 - w, min(mr, w)),
    )


def _contrasting_colour(rng: np.random.Generator, refs: np.ndarray, min_dist: float) -> np.ndarray:
    """A colour far from all reference colours; falls back to the farthest of the candidates."""
    cand = rng.uniform(0.0, 255.0, (64, 3))
    dist = np.sqrt(((cand[:, None, :] - refs[None, :, :]) ** 2).sum(-1)).min(1)
    ok = np.flatnonzero(dist >= min_dist)
    return cand[ok[0] if ok.size else int(np.argmax(dist))].astype(np.float32)


def _sample_appearance(rng: np.random.Generator, bg_samples: np.ndarray) -> _Appearance:
    sdf, marker = _sample_shape(rng)
    colour = _contrasting_colour(rng, bg_samples, _MIN_CONTRAST)
    marker_colour = _contrasting_colour(rng, colour[None, :], _MARKER_CONTRAST)
    return _Appearance(sdf, colour, marker, marker_colour)


# --------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class _Scene:
    background: np.ndarray  # float32 [H, W, 3]
    samples: np.ndarray  # background colours that objects must contrast with
    sigma: float
    distractor: tuple | None  # (mode, x, y, vx, vy, radius, colour, period, phase)


def _smooth_texture(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Low-frequency texture: a coarse random grid, upsampled with smoothstep interpolation."""
    g = int(rng.integers(3, 6))
    coarse = rng.normal(0.0, amplitude, (g, g, 3))
    pos = np.linspace(0.0, g - 1.0, size)
    i0 = np.minimum(pos.astype(int), g - 2)
    w = pos - i0
    w = w * w * (3.0 - 2.0 * w)
    m = np.zeros((size, g))
    m[np.arange(size), i0] = 1.0 - w
    m[np.arange(size), i0 + 1] = w
    return np.einsum("yi,ijc,xj->yxc", m, coarse, m)


def make_background(rng: np.random.Generator, frame_size: int = 112) -> np.ndarray:
    """A random static scene as streams use it: a colour gradient plus low-frequency texture.

    Public so that a training curriculum can start from a plain background and blend this one
    in (see ``examples/train_gestures.py``). Returns float32 [H, W, 3] in 0..255.
    """
    size = frame_size
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ang = rng.uniform(0.0, 2.0 * math.pi)
    t = (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0 = rng.uniform(40.0, 215.0, 3)
    c1 = np.clip(c0 + rng.uniform(-60.0, 60.0, 3), 0.0, 255.0)
    bg = c0 + (c1 - c0) * t[..., None] + _smooth_texture(rng, size, 10.0)
    return np.clip(bg, 0.0, 255.0).astype(np.float32)


def _make_scene(rng: np.random.Generator, size: int, background: np.ndarray | None = None) -> _Scene:
    if background is None:
        bg = make_background(rng, size)
    else:
        bg = np.asarray(background, dtype=np.float32)
        if bg.shape != (size, size, 3):
            raise ValueError(f"background must have shape {(size, size, 3)}, got {bg.shape}.")
    step = max(size // 8, 1)
    samples = bg[::step, ::step].reshape(-1, 3).astype(np.float64)
    sigma = float(rng.uniform(*_NOISE_SIGMA))
    distractor = None
    if rng.random() < 0.5:
        k = size / _REF_SIZE
        mode = "blink" if rng.random() < 0.5 else "drift"
        speed = rng.uniform(0.05, 0.3) * k if mode == "drift" else 0.0
        heading = rng.uniform(0.0, 2.0 * math.pi)
        distractor = (
            mode,
            float(rng.uniform(0, size)),
            float(rng.uniform(0, size)),
            speed * math.cos(heading),
            speed * math.sin(heading),
            float(rng.uniform(1.5, 3.0) * k),
            _contrasting_colour(rng, samples, 60.0),
            int(rng.integers(8, 25)),
            int(rng.integers(0, 24)),
        )
    return _Scene(bg, samples, sigma, distractor)


# --------------------------------------------------------------------------- motion


@dataclass
class _Track:
    """Per-frame pose of one appearance: centre (px, wrapped when drawn), radius (px), angle (rad)."""

    app: _Appearance
    label: int
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray

    def __len__(self) -> int:
        return len(self.cx)

    def split(self, n: int) -> tuple[_Track, _Track]:
        def part(sl: slice) -> _Track:
            return _Track(self.app, self.label, self.cx[sl], self.cy[sl], self.radius[sl], self.angle[sl])

        return part(slice(0, n)), part(slice(n, None))


def _zoom_log_change(rng: np.random.Generator, n: int) -> float:
    """Total log-radius change of a zoom gesture of n frames, capped to stay in the size range."""
    return min(float(rng.uniform(*_ZOOM_RATE)) * n, _ZOOM_MAX_LOG)


def _rest_pose(rng: np.random.Generator, label: int, n: int, size: int) -> tuple[tuple, float]:
    """Pose just before a gesture, plus the zoom change it needs. Only zooms constrain the pose."""
    k = size / _REF_SIZE
    lo, hi = math.log(_RADIUS[0] * k), math.log(_RADIUS[1] * k)
    zoom = _zoom_log_change(rng, n) if label in (_APPROACH, _RECEDE) else 0.0
    log_r = rng.uniform(lo, hi - zoom)
    if label == _RECEDE:  # the time-reverse of an approach, so both visit the same sizes
        log_r += zoom
    pose = (rng.uniform(0, size), rng.uniform(0, size), math.exp(log_r), rng.uniform(0, 2 * math.pi))
    return pose, zoom


def _gesture_track(
    rng: np.random.Generator, app: _Appearance, label: int, n: int, size: int, pose: tuple, zoom: float
) -> _Track:
    """Motion that starts one frame after ``pose``, so the first labelled frame already moves."""
    k = size / _REF_SIZE
    t = np.arange(1, n + 1, dtype=np.float64)
    cx = np.full(n, pose[0])
    cy = np.full(n, pose[1])
    radius = np.full(n, pose[2])
    angle = np.full(n, pose[3])
    if label in _SWIPES:
        dx, dy = _SWIPES[label]
        skew = math.tan(math.radians(rng.uniform(-_SWIPE_SKEW_DEG, _SWIPE_SKEW_DEG)))
        dx, dy = dx - dy * skew, dy + dx * skew
        norm = math.hypot(dx, dy)
        speed = rng.uniform(*_SWIPE_SPEED) * k
        cx = cx + t * speed * dx / norm
        cy = cy + t * speed * dy / norm
    elif label in (_ROTATE_CW, _ROTATE_CCW):
        # With y pointing down, a growing angle turns the object clockwise on screen.
        omega = math.radians(rng.uniform(*_ROT_SPEED_DEG))
        angle = angle + t * (omega if label == _ROTATE_CW else -omega)
    elif label in (_APPROACH, _RECEDE):
        rate = zoom / max(n, 1)
        radius = radius * np.exp(t * (rate if label == _APPROACH else -rate))
    elif label != NO_GESTURE:
        raise ValueError(f"label {label} is not a class index in 0..{len(classes) - 1}.")
    if label == NO_GESTURE:
        jitter = _jitter(rng, n)
        cx, cy = cx + jitter[:, 0], cy + jitter[:, 1]
    return _Track(app, label, cx, cy, radius, angle)


def _jitter(rng: np.random.Generator, n: int) -> np.ndarray:
    amp = rng.uniform(*_JITTER_STILL) if rng.random() < 0.5 else 0.0
    return rng.uniform(-amp, amp, (n, 2))


def _still_track(rng: np.random.Generator, app: _Appearance, n: int, pose: tuple) -> _Track:
    jitter = _jitter(rng, n)
    return _Track(
        app,
        NO_GESTURE,
        pose[0] + jitter[:, 0],
        pose[1] + jitter[:, 1],
        np.full(n, pose[2]),
        np.full(n, pose[3]),
    )


# --------------------------------------------------------------------------- drawing


def _patch(size: int, cx: float, cy: float, reach: float) -> tuple[np.ndarray, ...]:
    """Rows, columns and offsets (to the nearest copy of the centre on the torus) of the pixels
    within ``reach`` of it, so drawing costs the object's area rather than the frame's."""
    grid = np.arange(size, dtype=np.float32)
    half = size / 2.0
    dx = (grid - np.float32(cx) + half) % size - half
    dy = (grid - np.float32(cy) + half) % size - half
    rows = np.flatnonzero(np.abs(dy) <= reach)
    cols = np.flatnonzero(np.abs(dx) <= reach)
    return rows[:, None], cols[None, :], dy[rows][:, None], dx[cols][None, :]


def _blend(img: np.ndarray, dist_px: np.ndarray, colour: np.ndarray) -> None:
    """Anti-aliased fill: coverage falls from 1 to 0 across one pixel of the signed distance."""
    alpha = np.clip(0.5 - dist_px, 0.0, 1.0)
    img += alpha[..., None] * (colour - img)


def _draw_object(img: np.ndarray, app: _Appearance, cx: float, cy: float, r: float, ang: float) -> None:
    rows, cols, dy, dx = _patch(img.shape[0], cx, cy, 1.05 * r + 1.5)
    patch = img[rows, cols]
    c, s = np.float32(math.cos(ang) / r), np.float32(math.sin(ang) / r)
    u = dx * c + dy * s  # inverse rotation and scale into the object's frame
    v = dy * c - dx * s
    _blend(patch, app.sdf(u, v) * np.float32(r), app.colour)
    mu, mv, mr = app.marker
    _blend(patch, (np.sqrt((u - mu) ** 2 + (v - mv) ** 2) - mr) * np.float32(r), app.marker_colour)
    img[rows, cols] = patch


def _draw_distractor(img: np.ndarray, scene: _Scene, t: int) -> None:
    mode, x, y, vx, vy, radius, colour, period, phase = scene.distractor
    if mode == "blink" and ((t + phase) // period) % 2:
        return
    size = img.shape[0]
    rows, cols, dy, dx = _patch(size, (x + vx * t) % size, (y + vy * t) % size, radius + 1.5)
    patch = img[rows, cols]
    _blend(patch, np.sqrt(dx * dx + dy * dy) - radius, colour)
    img[rows, cols] = patch


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Near-Gaussian noise (sum of four uniform bytes, Irwin-Hall), about 5x cheaper than
    ``standard_normal``, which would otherwise dominate generation time."""
    n = int(np.prod(shape))
    b = np.frombuffer(rng.bytes(4 * n), dtype=np.uint8).reshape(4, n).astype(np.int16)
    total = (b[0] + b[1]) + (b[2] + b[3])  # mean 510, std 147.8
    scale = np.float32(sigma / math.sqrt(4 * (256**2 - 1) / 12.0))
    return ((total.astype(np.float32) - np.float32(510.0)) * scale).reshape(shape)


def _render(
    scene: _Scene, tracks: list[_Track], t0: int, noise_rng: np.random.Generator, out: np.ndarray
) -> None:
    """Draw consecutive frames (stream time t0 onwards) into ``out``, noise drawn frame by frame."""
    size = scene.background.shape[0]
    i = 0
    for tr in tracks:
        for j in range(len(tr)):
            img = scene.background.copy()
            if scene.distractor is not None:
                _draw_distractor(img, scene, t0 + i)
            _draw_object(
                img, tr.app, float(tr.cx[j]), float(tr.cy[j]), float(tr.radius[j]), float(tr.angle[j])
            )
            img += _noise(noise_rng, (size, size, 3), scene.sigma)
            np.clip(img, 0.0, 255.0, out=img)
            out[i] = (img + 0.5).astype(np.uint8)
            i += 1


# --------------------------------------------------------------------------- public API


def make_clip(
    rng: np.random.Generator,
    label: int,
    n_frames: int,
    frame_size: int = 112,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """One gesture on its own, for unit tests and per-class inspection.

    The clip starts from a rest pose one frame before frame 0, so frame 0 already moves. Zoom
    clips longer than the stream's zoom gestures (SEGMENT_FRAMES) zoom more slowly, because the
    total change is capped to keep the object within its size range.
    ``background`` ([H, W, 3], any numeric dtype) fixes the static scene, which lets a caller
    segment the object by differencing; noise and, with probability 1/2 for every class, a
    distractor are still added. Returns uint8 [T, H, W, 3].
    """
    if not 0 <= label < len(classes):
        raise ValueError(f"label {label} is not a class index in 0..{len(classes) - 1}.")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}.")
    scene = _make_scene(rng, frame_size, background)
    app = _sample_appearance(rng, scene.samples)
    pose, zoom = _rest_pose(rng, label, n_frames, frame_size)
    track = _gesture_track(rng, app, label, n_frames, frame_size, pose, zoom)
    out = np.empty((n_frames, frame_size, frame_size, 3), dtype=np.uint8)
    _render(scene, [track], 0, rng, out)
    return out


class _Stream:
    """Plans segments on demand and renders them; chunk size never changes what comes out."""

    def __init__(self, seed: int, frame_size: int, background: np.ndarray | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.size = frame_size
        self.scene = _make_scene(self.rng, frame_size, background)
        self.noise_rng = np.random.default_rng(int(self.rng.integers(2**63)))
        self.app = _sample_appearance(self.rng, self.scene.samples)
        self.pose, _ = _rest_pose(self.rng, NO_GESTURE, 1, frame_size)
        self.queue: list[_Track] = []
        self.t = 0

    def _plan(self) -> None:
        """A gap (rest, then the object re-appears at the next gesture's start pose), then a gesture."""
        rng = self.rng
        lo, hi = SEGMENT_FRAMES["no_gesture"]
        gap = int(rng.integers(lo, hi + 1))
        cut = int(rng.integers(2, gap - 4))  # >= 2 frames at the old pose, >= 5 at the new one
        label = int(rng.integers(1, len(classes)))
        lo, hi = SEGMENT_FRAMES[classes[label]]
        n = int(rng.integers(lo, hi + 1))
        self.queue.append(_still_track(rng, self.app, cut, self.pose))
        if rng.random() < _REAPPEAR_NEW_OBJECT:
            self.app = _sample_appearance(rng, self.scene.samples)
        pose, zoom = _rest_pose(rng, label, n, self.size)
        self.queue.append(_still_track(rng, self.app, gap - cut, pose))
        gesture = _gesture_track(rng, self.app, label, n, self.size, pose, zoom)
        self.queue.append(gesture)
        self.pose = (
            float(gesture.cx[-1]) % self.size,
            float(gesture.cy[-1]) % self.size,
            float(gesture.radius[-1]),
            float(gesture.angle[-1]) % (2 * math.pi),
        )

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        tracks: list[_Track] = []
        have = 0
        while have < n:
            if not self.queue:
                self._plan()
            tr = self.queue.pop(0)
            if have + len(tr) > n:
                tr, rest = tr.split(n - have)
                self.queue.insert(0, rest)
            tracks.append(tr)
            have += len(tr)
        frames = np.empty((n, self.size, self.size, 3), dtype=np.uint8)
        _render(self.scene, tracks, self.t, self.noise_rng, frames)
        labels = (
            np.concatenate([np.full(len(tr), tr.label, dtype=np.int64) for tr in tracks])
            if tracks
            else (np.zeros(0, dtype=np.int64))
        )
        self.t += n
        return frames, labels


def iter_stream(seed: int, frame_size: int = 112, chunk: int = 256) -> Iterator[tuple[np.ndarray, int]]:
    """Endless (frame, label) pairs, so a live consumer needs no frame count up front.

    Frames are rendered ``chunk`` at a time for speed; the first n equal ``make_stream(seed, n)``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive frame count, got {chunk}.")
    stream = _Stream(seed, frame_size)
    while True:
        frames, labels = stream.take(chunk)
        for frame, label in zip(frames, labels, strict=True):
            yield frame, int(label)


def make_stream(
    seed: int, n_frames: int, frame_size: int = 112, background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A continuous stream: gaps of "no_gesture" (SEGMENT_FRAMES) alternate with gestures.

    Returns frames uint8 [T, H, W, 3] and per-frame labels int64 [T]; the last segment is cut
    wherever ``n_frames`` ends. Same frames as the first ``n_frames`` of ``iter_stream(seed)``.
    ``background`` ([H, W, 3]) replaces the random static scene, as in ``make_clip``.
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}.")
    return _Stream(seed, frame_size, background).take(n_frames)


def gesture_segments(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal labels as (start, stop, label), stop exclusive.

    Evaluation scores frames relative to the start of their segment (a causal model cannot
    know a gesture before it has seen some of it) and votes per segment; gaps separate gestures,
    so runs of equal labels are exactly the segments.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return []
    edges = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [labels.size]])
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops, strict=True)]


def parse_source(spec: str) -> int | None:
    """The seed of a ``synthetic`` source spec, or None when the spec names another source.

    "synthetic" means seed 0, "synthetic:SEED" a non-negative integer seed. Anything else that
    starts with "synthetic" is almost certainly a typo, so it fails loudly instead of being
    taken for a file or camera name.
    """
    if not spec.startswith("synthetic"):
        return None
    if spec == "synthetic":
        return 0
    head, sep, tail = spec.partition(":")
    if head == "synthetic" and sep and tail.isascii() and tail.isdigit():
        return int(tail)
    raise ValueError(
        f"bad synthetic source {spec!r}: expected 'synthetic' or 'synthetic:SEED' with SEED a non-negative integer."
    )
