"""Train the zoo's gesture models on synthetic gesture streams (PyTorch, CPU, fixed seeds).

    PYTHONPATH=. python3 examples/train_gestures.py --model d-resnet18
    PYTHONPATH=. python3 examples/train_gestures.py --model tsm-resnet18

Training clips are cut from long ``make_stream`` streams (train seeds 1000+), so they contain
gesture boundaries and "no gesture" gaps, and every clip starts from zero state, as the runtime
does at stream start. Frames are rendered at 112 px and shrunk with the runtime's own
``resize``, then normalised with the mean/std the artifact's manifest will carry. Held-out
accuracy is measured on seeds 1..N (never used for training), running each whole stream
from zero state in clip mode, which equals what ``Session`` computes frame by frame.
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

TRAIN_SEED0 = 1000


def render(seed: int, n_frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream rendered at 112 px and resized exactly as the runtime resizes camera frames."""
    frames, labels = gestures.make_stream(seed, n_frames, frame_size=112)
    return np.stack([resize(f, size, size) for f in frames]), labels


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SPECS), default="d-resnet18")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip", type=int, default=32, help="clip length in frames (each starts from zero state)")
    ap.add_argument("--train-streams", type=int, default=32)
    ap.add_argument("--stream-frames", type=int, default=500)
    ap.add_argument("--heldout-streams", type=int, default=6, help="held-out seeds 1..N")
    ap.add_argument("--heldout-frames", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--refresh", type=int, default=0,
                    help="every N steps replace one training stream by a stream from a new seed (0: never); "
                         "a fixed pool of streams is memorised instead of generalising")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    spec = SPECS[args.model]
    size = spec["frame_size"]
    out = args.out or CHECKPOINTS / spec["checkpoint"]

    t0 = time.time()
    train = [render(TRAIN_SEED0 + i, args.stream_frames, size) for i in range(args.train_streams)]
    heldout = [render(seed, args.heldout_frames, size) for seed in range(1, args.heldout_streams + 1)]
    frames = np.stack([f for f, _ in train])
    labels = torch.from_numpy(np.stack([lab for _, lab in train]))
    print(f"data: {frames.shape[0]} train streams x {frames.shape[1]} frames at {size} px "
          f"({time.time() - t0:.0f} s)", flush=True)

    model = make_network(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    warm = 2  # frames at a clip start without context; a mid-gesture start is unknowable there
    t1 = time.time()
    next_seed = TRAIN_SEED0 + args.train_streams
    for step in range(1, args.steps + 1):
        if args.refresh and step % args.refresh == 0:
            f, lab = render(next_seed, args.stream_frames, size)
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
            msg = f"step {step}/{args.steps} loss {loss.item():.3f} ({time.time() - t1:.0f} s)"
            if step % 150 == 0 or step == args.steps:
                fa, ga, n, g = evaluate(model, heldout)
                msg += f"  held-out frame {100 * fa:.1f}% gesture {100 * ga:.1f}%"
            print(msg, flush=True)

    fa, ga, n, g = evaluate(model, heldout)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"trained {args.model} in {time.time() - t0:.0f} s; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    print(f"held-out seeds 1..{args.heldout_streams} x {args.heldout_frames} frames: per-frame accuracy "
          f"{100 * fa:.1f}% ({n} frames after the first 8 of each segment), "
          f"gesture accuracy {100 * ga:.1f}% ({g} gestures, majority vote)")


if __name__ == "__main__":
    main()
