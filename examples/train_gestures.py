"""Train the zoo's gesture models on synthetic gesture streams (PyTorch, CPU, fixed seeds).

    PYTHONPATH=. python3 examples/train_gestures.py --model d-resnet18
    PYTHONPATH=. python3 examples/train_gestures.py --model tsm-resnet18

Training clips are cut from ``make_stream`` streams (seeds 1000+) held in a pool whose streams are
replaced by new seeds as training goes (a fixed pool is memorised: its backgrounds and colours
identify the labels), so they contain gesture boundaries and "no gesture" gaps, and every clip
starts from zero state, as the runtime does at stream start. Frames are rendered at 112 px and
shrunk with the runtime's own ``resize``, then normalised with the mean/std the artifact's
manifest will carry.

Why a curriculum: from scratch, the networks do not find motion on the real scenes at all (the
loss stays at the class prior for thousands of steps), because each stream's background colour
and gradient move every feature far more than a small moving object does. On a flat grey scene
the same network learns the gestures within a few hundred steps, and what it learnt there
carries over while the real background is blended in (``--plain-steps``, then ``--ramp-steps``).

Accuracy is measured running each whole stream from zero state in clip mode, which equals what
``Session`` computes frame by frame: on validation seeds 500+ while training, and once at the end
on the test seeds 1..6 that ``tests/test_gestures_model.py`` uses (never used for choices here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edge3d.runtime.preprocess import resize

from edge3d.data import gestures
from edge3d.zoo.gestures import CHECKPOINTS, FRAME_MEAN, FRAME_STD, SPECS, make_network, score

TRAIN_SEED0 = 1000  # training streams: seeds 1000, 1001, ...
VAL_SEED0 = 500  # validation streams watched while training; the tests use seeds 1..6, never seen here


GREY = 128.0


def render(seed: int, n_frames: int, size: int, scene: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A stream rendered at 112 px and resized exactly as the runtime resizes camera frames.

    ``scene`` < 1 blends the stream's random background towards plain grey (the curriculum):
    0 is a flat grey scene, 1 the real distribution.
    """
    background = None
    if scene < 1.0:
        bg = gestures.make_background(np.random.default_rng([seed, 7]), 112)
        background = GREY + scene * (bg - GREY)
    frames, labels = gestures.make_stream(seed, n_frames, frame_size=112, background=background)
    return np.stack([resize(f, size, size) for f in frames]), labels


def gesture_clips(rng: np.random.Generator, n: int, n_frames: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Single-gesture clips (every class, "no gesture" included) on a flat grey scene: the first stage."""
    grey = np.full((112, 112, 3), GREY, np.float32)
    labels = rng.integers(0, len(gestures.classes), n)
    clips = [gestures.make_clip(rng, int(lab), n_frames, 112, background=grey) for lab in labels]
    frames = np.stack([np.stack([resize(f, size, size) for f in clip]) for clip in clips])
    return frames, torch.from_numpy(labels)[:, None]


def scene_strength(step: int, plain: int, ramp: int) -> float:
    """Curriculum: grey scenes for ``plain`` steps, then a linear blend to real scenes over ``ramp``."""
    if step <= plain:
        return 0.0
    return min(1.0, (step - plain) / max(ramp, 1))


def to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> normalised float [..., 3, T, H, W] (the manifest's formula)."""
    x = torch.from_numpy(frames).float().div_(255.0)
    mean, std = torch.tensor(FRAME_MEAN), torch.tensor(FRAME_STD)
    x = (x - mean) / std
    return x.movedim(-1, -4).contiguous()


@torch.no_grad()
def evaluate(model: torch.nn.Module, streams: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, int, int]:
    model.eval()
    preds, labels = [], []
    for frames, lab in streams:
        logits = model(to_input(frames)[None])[0]  # (K, T), whole stream from zero state
        preds.append(logits.argmax(0).numpy())
        labels.append(lab)
    # score each stream separately (segments must not join across streams), then pool counts
    hit = total = g_hit = g_total = 0
    for p, lab in zip(preds, labels, strict=True):
        fa, ga, n, g = score(p, lab)
        hit += fa * n
        total += n
        g_hit += ga * g
        g_total += g
    return hit / total, g_hit / g_total, total, g_total


# Stream steps per architecture: TSM sees the past only through shifted channels and needed about
# twice as long to tell the rotation directions apart (4,200 steps: 95.1% of test gestures; 8,000: 100%).
STREAM_STEPS = {"d-resnet18": 4200, "tsm-resnet18": 8000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SPECS), default="d-resnet18")
    ap.add_argument("--steps", type=int, default=None,
                    help="stream steps after the clip steps (default: what the shipped checkpoint used, "
                         + ", ".join(f"{k} {v}" for k, v in STREAM_STEPS.items()) + ")")
    ap.add_argument("--clip-steps", type=int, default=600,
                    help="curriculum stage 1: steps on single-gesture clips on a grey scene (lr 1e-3)")
    ap.add_argument("--clip-batch", type=int, default=16)
    ap.add_argument("--clip-frames", type=int, default=12)
    ap.add_argument("--plain-steps", type=int, default=300,
                    help="curriculum stage 2: stream steps on flat grey scenes before real backgrounds are blended in")
    ap.add_argument("--ramp-steps", type=int, default=1000,
                    help="curriculum stage 3: stream steps over which the scene blends from grey to the real one")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip", type=int, default=32, help="clip length in frames (each starts from zero state)")
    ap.add_argument("--train-streams", type=int, default=24, help="streams held in the training pool")
    ap.add_argument("--stream-frames", type=int, default=320)
    ap.add_argument("--refresh", type=int, default=2,
                    help="every N steps one pool stream is replaced by a new seed at the current curriculum "
                         "stage (0: never; a fixed pool is memorised instead of generalising)")
    ap.add_argument("--val-streams", type=int, default=30,
                    help=f"validation seeds {VAL_SEED0}.. watched during training and reported at the end")
    ap.add_argument("--heldout-streams", type=int, default=6,
                    help="test seeds 1..N (the tests' streams), reported once at the end")
    ap.add_argument("--heldout-frames", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=None,
                    help="where to save the state_dict (default: the zoo's own checkpoint in edge3d/zoo/weights/, "
                         "which `edge3d export gestures` then uses)")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = STREAM_STEPS[args.model]

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    spec = SPECS[args.model]
    size = spec["frame_size"]
    out = args.out or CHECKPOINTS / spec["checkpoint"]

    t0 = time.time()
    train = [render(TRAIN_SEED0 + i, args.stream_frames, size, scene_strength(0, args.plain_steps, args.ramp_steps))
             for i in range(args.train_streams)]
    val = [render(VAL_SEED0 + i, args.heldout_frames, size) for i in range(args.val_streams)]
    frames = np.stack([f for f, _ in train])
    labels = torch.from_numpy(np.stack([lab for _, lab in train]))
    print(f"data: {frames.shape[0]} train streams x {frames.shape[1]} frames at {size} px "
          f"({time.time() - t0:.0f} s)", flush=True)

    model = make_network(args.model)
    warm = 2  # frames at a clip start without context; a mid-gesture start is unknowable there
    t1 = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for step in range(1, args.clip_steps + 1):
        model.train()
        clips, y = gesture_clips(rng, args.clip_batch, args.clip_frames, size)
        # one label per clip, scored on its last frames' mean logits: a per-frame loss (with label
        # smoothing) on these short clips, whose first frames have little context, stayed at chance
        # for 500 steps
        logits = model(to_input(clips))[:, :, -4:].mean(-1)
        loss = F.cross_entropy(logits, y[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            acc = (logits.argmax(1) == y[:, 0]).float().mean().item()
            print(f"clip step {step}/{args.clip_steps} loss {loss.item():.3f} accuracy {100 * acc:.0f}% "
                  f"({time.time() - t1:.0f} s)", flush=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    next_seed = TRAIN_SEED0 + args.train_streams
    for step in range(1, args.steps + 1):
        if args.refresh and step % args.refresh == 0:
            f, lab = render(next_seed, args.stream_frames, size,
                            scene_strength(step, args.plain_steps, args.ramp_steps))
            slot = next_seed % frames.shape[0]
            frames[slot], labels[slot] = f, torch.from_numpy(lab)
            next_seed += 1
        model.train()
        s = rng.integers(0, frames.shape[0], args.batch)
        o = rng.integers(0, frames.shape[1] - args.clip + 1, args.batch)
        # a quarter of the clips start at the stream start, exactly as the runtime begins
        o[: args.batch // 4] = 0
        idx = o[:, None] + np.arange(args.clip)
        x = to_input(frames[s[:, None], idx])
        y = labels[s[:, None], idx]
        logits = model(x)  # (N, K, T)
        loss = F.cross_entropy(logits[:, :, warm:], y[:, warm:], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            stage = scene_strength(step, args.plain_steps, args.ramp_steps)
            msg = f"step {step}/{args.steps} scene {stage:.2f} loss {loss.item():.3f} ({time.time() - t1:.0f} s)"
            if step % 300 == 0 or step == args.steps:
                fa, ga, n, g = evaluate(model, val[:6])
                msg += f"  validation (6 streams) frame {100 * fa:.1f}% gesture {100 * ga:.1f}%"
            print(msg, flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"trained {args.model} in {time.time() - t0:.0f} s; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    test = [render(seed, args.heldout_frames, size) for seed in range(1, args.heldout_streams + 1)]
    for name, streams in ((f"validation seeds {VAL_SEED0}..{VAL_SEED0 + args.val_streams - 1}", val),
                          (f"test seeds 1..{args.heldout_streams}", test)):
        fa, ga, n, g = evaluate(model, streams)
        print(f"{name} x {args.heldout_frames} frames: per-frame accuracy {100 * fa:.1f}% ({n} frames after "
              f"the first 8 of each segment), gesture accuracy {100 * ga:.1f}% ({g} gestures, majority vote)")


if __name__ == "__main__":
    main()
