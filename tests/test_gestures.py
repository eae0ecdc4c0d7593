"""Tests for the synthetic gesture source.

Beyond shapes and determinism, the point is the property the source exists for: one frame
must not tell the class while a few frames of motion must. Both are checked with the same
cheap nearest-class-mean classifier on hand-made object features.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge3d.data import gestures as g

SIZE = 112


# --------------------------------------------------------------------------- helpers


def _wrap(d: np.ndarray | float, period: float = SIZE) -> np.ndarray | float:
    return (d + period / 2) % period - period / 2


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component on the torus (objects wrap around the frame edges),
    which drops the small background distractor some clips carry."""
    big = mask.size
    lab = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        new = lab
        for axis in (0, 1):
            for shift in (1, -1):
                new = np.minimum(new, np.roll(lab, shift, axis))
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[np.argmax(counts)]


def _object_features(frame: np.ndarray, background: np.ndarray) -> dict:
    """Centroid (circular mean, because of wrap-around), area, mean colour, 2nd complex moment."""
    diff = np.abs(frame.astype(np.float32) - background).max(-1)
    mask = _largest_component(diff > 30)
    ys, xs = np.nonzero(mask)
    k = 2 * np.pi / SIZE
    cx = (np.angle(np.exp(1j * k * xs).mean()) / k) % SIZE
    cy = (np.angle(np.exp(1j * k * ys).mean()) / k) % SIZE
    z = _wrap(xs - cx) + 1j * _wrap(ys - cy)
    return {
        "cx": cx,
        "cy": cy,
        "area": float(xs.size),
        "colour": frame[mask].astype(np.float32).mean(0),
        "m2": (z**2).mean(),
    }


def _nearest_class_mean_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Fit class means on the first half (standardised features), score on the second half."""
    n = len(y) // 2
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-9
    z = (x - mu) / sd
    means = np.stack([z[:n][y[:n] == c].mean(0) for c in range(len(g.classes))])
    pred = np.argmin(((z[n:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return float((pred == y[n:]).mean())


@pytest.fixture(scope="module")
def clip_features() -> dict:
    """Features of 48 clips per class, interleaved so both halves hold every class."""
    rng = np.random.default_rng(2024)
    single, motion, labels, still_shift = [], [], [], []
    for _ in range(48):
        for label in range(len(g.classes)):
            background = g._make_scene(rng, SIZE).background
            clip = g.make_clip(rng, label, 9, SIZE, background=background)
            t = int(rng.integers(0, 5))
            a = _object_features(clip[t], background)
            b = _object_features(clip[t + 4], background)
            single.append([a["cx"], a["cy"], a["area"], *a["colour"]])
            motion.append(
                [
                    _wrap(b["cx"] - a["cx"]),
                    _wrap(b["cy"] - a["cy"]),
                    np.log(b["area"] / a["area"]),
                    np.degrees(np.angle(b["m2"] / a["m2"]) / 2),  # orientation change
                ]
            )
            labels.append(label)
            if label == 0:
                c = _object_features(clip[t + 1], background)
                still_shift.append(np.hypot(_wrap(c["cx"] - a["cx"]), _wrap(c["cy"] - a["cy"])))
    return {
        "single": np.array(single),
        "motion": np.array(motion),
        "labels": np.array(labels),
        "still_shift": np.array(still_shift),
    }


# --------------------------------------------------------------------------- API and shapes


def test_class_list() -> None:
    assert g.classes[0] == "no_gesture"
    assert len(g.classes) == 9
    assert len(set(g.classes)) == 9
    assert {"swipe_left", "swipe_right", "swipe_up", "swipe_down", "rotate_cw", "rotate_ccw"} <= set(
        g.classes
    )
    assert {"approach", "recede"} <= set(g.classes)


def test_shapes_and_dtypes() -> None:
    frames, labels = g.make_stream(3, 50, 64)
    assert frames.shape == (50, 64, 64, 3) and frames.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int64
    clip = g.make_clip(np.random.default_rng(0), 5, 10)
    assert clip.shape == (10, 112, 112, 3) and clip.dtype == np.uint8
    frame, label = next(g.iter_stream(3, 64))
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and isinstance(label, int)
    empty, empty_labels = g.make_stream(3, 0, 64)
    assert empty.shape == (0, 64, 64, 3) and empty_labels.shape == (0,)


def test_make_clip_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label 9"):
        g.make_clip(rng, 9, 4)
    with pytest.raises(ValueError, match="background"):
        g.make_clip(rng, 1, 4, 64, background=np.zeros((32, 32, 3)))


def test_make_stream_on_a_given_background() -> None:
    """The training curriculum's plain scenes: the given background replaces the random one."""
    grey = np.full((64, 64, 3), 128.0)
    frames, labels = g.make_stream(3, 160, 64, background=grey)
    median = np.median(frames.astype(np.float32), axis=0)  # objects move on, noise averages out
    assert np.mean(np.abs(median - 128.0).max(-1) < 8) > 0.9
    random_scene, _ = g.make_stream(3, 160, 64)
    assert np.mean(np.abs(np.median(random_scene.astype(np.float32), axis=0) - 128.0).max(-1) < 8) < 0.5
    with pytest.raises(ValueError, match="background"):
        g.make_stream(3, 10, 64, background=np.zeros((32, 32, 3)))
    bg = g.make_background(np.random.default_rng(1), 64)
    assert bg.shape == (64, 64, 3) and bg.dtype == np.float32 and 0 <= bg.min() and bg.max() <= 255
    assert not np.array_equal(bg, g.make_background(np.random.default_rng(2), 64))


def test_make_stream_is_deterministic_per_seed() -> None:
    f1, l1 = g.make_stream(7, 200, 64)
    f2, l2 = g.make_stream(7, 200, 64)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(l1, l2)
    f3, l3 = g.make_stream(8, 200, 64)
    assert not np.array_equal(f1, f3)
    assert not np.array_equal(l1, l3)


def test_make_clip_is_deterministic_per_rng() -> None:
    a = g.make_clip(np.random.default_rng(5), 3, 8, 64)
    b = g.make_clip(np.random.default_rng(5), 3, 8, 64)
    c = g.make_clip(np.random.default_rng(6), 3, 8, 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("chunk", [37, 256])
def test_iter_stream_equals_make_stream_prefix(chunk: int) -> None:
    n = 300  # crosses a chunk boundary for both chunk sizes
    frames, labels = g.make_stream(11, n, 64)
    it = g.iter_stream(11, 64, chunk=chunk)
    got = [next(it) for _ in range(n)]
    np.testing.assert_array_equal(np.stack([f for f, _ in got]), frames)
    np.testing.assert_array_equal(np.array([lab for _, lab in got]), labels)


# --------------------------------------------------------------------------- stream structure


def test_documented_segment_ranges() -> None:
    expected = {name: (16, 40) for name in g.classes}
    expected["no_gesture"] = (8, 24)
    expected["approach"] = expected["recede"] = (16, 22)
    assert g.SEGMENT_FRAMES == expected


def test_long_stream_covers_classes_with_lengths_in_range() -> None:
    frames, labels = g.make_stream(1, 3000, 48)
    assert set(np.unique(labels).tolist()) == set(range(len(g.classes)))
    segments = g.gesture_segments(labels)
    assert segments[0][2] == 0, "a stream starts with a gap"
    kinds = [label == 0 for _, _, label in segments]
    assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)), "gaps and gestures must alternate"
    for start, stop, label in segments[:-1]:  # the last one is cut by n_frames
        lo, hi = g.SEGMENT_FRAMES[g.classes[label]]
        assert lo <= stop - start <= hi, (start, stop, label)
    assert len(segments) > 100


def test_gesture_segments() -> None:
    labels = np.array([0, 0, 3, 3, 3, 0, 7, 7, 0], dtype=np.int64)
    assert g.gesture_segments(labels) == [(0, 2, 0), (2, 5, 3), (5, 6, 0), (6, 8, 7), (8, 9, 0)]
    assert g.gesture_segments(np.zeros(0, dtype=np.int64)) == []
    assert g.gesture_segments(np.array([4])) == [(0, 1, 4)]
    _, stream_labels = g.make_stream(2, 500, 32)
    rebuilt = np.concatenate([np.full(b - a, lab) for a, b, lab in g.gesture_segments(stream_labels)])
    np.testing.assert_array_equal(rebuilt, stream_labels)


def test_gestures_move_and_gap_tails_rest_in_stream() -> None:
    """Pixels that change by more than 40 levels over 4 frames: many once a gesture has run 4
    frames, few over the last 4 frames of a gap (the object has re-appeared and rests there,
    with sub-pixel tremor, noise and perhaps the distractor)."""
    frames, labels = g.make_stream(4, 1500, SIZE)
    f = frames.astype(np.int16)

    def changed(a: int, b: int) -> int:
        return int((np.abs(f[b] - f[a]).max(-1) > 40).sum())

    ratios = []
    for start, _, label in g.gesture_segments(labels)[1:-1]:
        if label != 0:
            ratios.append(changed(start - 1, start + 3) / max(changed(start - 5, start - 1), 10))
    assert len(ratios) > 20
    assert np.mean(np.array(ratios) > 2) >= 0.95, np.round(ratios, 1)


# --------------------------------------------------------------------------- the point of the source


def test_single_frame_cannot_tell_the_class(clip_features: dict) -> None:
    x, y = clip_features["single"], clip_features["labels"]
    accuracy = _nearest_class_mean_accuracy(x, y)
    assert accuracy < 0.35, f"single-frame features give away the class ({accuracy:.2f})"
    # The classifier above dilutes a leak in one feature among the others, so also compare each
    # class with the rest feature by feature (standardised mean difference; sampling noise with
    # 48 clips per class stays below ~0.65, a position or size bias for one class exceeds 1).
    k = 2 * np.pi / SIZE
    per_frame = np.column_stack(
        [
            np.cos(k * x[:, 0]),  # positions are circular: the object wraps around the edges
            np.sin(k * x[:, 0]),
            np.cos(k * x[:, 1]),
            np.sin(k * x[:, 1]),
            np.log(x[:, 2]),
            x[:, 3:],
        ]
    )
    sd = per_frame.std(0)
    smd = np.array([(per_frame[y == c].mean(0) - per_frame[y != c].mean(0)) / sd for c in range(9)])
    assert np.abs(smd).max() < 0.8, np.round(smd, 2)


def test_motion_over_four_frames_tells_the_class(clip_features: dict) -> None:
    accuracy = _nearest_class_mean_accuracy(clip_features["motion"], clip_features["labels"])
    assert accuracy > 0.8, f"4-frame motion features should identify the class ({accuracy:.2f})"


def test_motion_is_strong_and_in_the_right_direction(clip_features: dict) -> None:
    """Signs follow image coordinates (y down; a clockwise turn grows the orientation angle)."""
    m, y = clip_features["motion"], clip_features["labels"]
    med = {name: np.median(m[y == i], axis=0) for i, name in enumerate(g.classes)}
    assert med["swipe_left"][0] < -8 and med["swipe_right"][0] > 8
    assert med["swipe_up"][1] < -8 and med["swipe_down"][1] > 8
    assert med["rotate_cw"][3] > 25 and med["rotate_ccw"][3] < -25
    assert med["approach"][2] > 0.25 and med["recede"][2] < -0.25  # log area over 4 frames
    still = med["no_gesture"]
    assert abs(still[0]) < 1 and abs(still[1]) < 1 and abs(still[2]) < 0.05 and abs(still[3]) < 3
    assert np.percentile(clip_features["still_shift"], 90) <= 1.0  # tremor < 1 px, plus noise


def test_generation_speed() -> None:
    g.make_stream(0, 8, SIZE)  # warm-up
    start = time.perf_counter()
    g.make_stream(0, 1000, SIZE)
    elapsed = time.perf_counter() - start
    assert elapsed < 4.0, f"1000 frames at {SIZE}x{SIZE} took {elapsed:.2f} s"


# --------------------------------------------------------------------------- source specs


def test_parse_source() -> None:
    assert g.parse_source("synthetic") == 0
    assert g.parse_source("synthetic:0") == 0
    assert g.parse_source("synthetic:1234") == 1234
    assert g.parse_source("video.mp4") is None
    assert g.parse_source("0") is None
    assert g.parse_source("rtsp://cam/synthetic") is None


@pytest.mark.parametrize(
    "spec", ["synthetic:", "synthetic:abc", "synthetic:-1", "synthetic12", "synthetic:1:2", "synthetic: 3"]
)
def test_parse_source_rejects_malformed_synthetic(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        g.parse_source(spec)
    message = str(err.value)
    assert repr(spec) in message
    assert "'synthetic'" in message and "'synthetic:SEED'" in message
