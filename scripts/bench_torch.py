#!/usr/bin/env python3
"""PyTorch's side of the CPU benchmark: the cases of `bench_table` (same losses, sizes,
reductions and input distributions) as a PyTorch / torchvision user writes them, timed the same
way (one warm-up, 7 runs, median), as a training step (forward of a tensor that requires grad,
then backward) and as the forward alone, with the default glibc allocator and with its mmap
threshold raised (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000: no page faults for
torch's large temporaries). Each allocator runs in its own child process (glibc reads those
variables at start-up).

    python3 scripts/bench_torch.py OUT.json [--anchors N] [--threads T] [--only TEXT]

writes one JSON row per case and pass: {"loss", "shape", "pass", "torch_default_ms",
"torch_tuned_ms", "torch", "torchvision", "threads"}; the `loss` and `shape` strings are
bench_table's, so `bench_table --torch OUT.json` joins both into one table with the ratios.
Needs torch and torchvision from PyPI (not in CI).

The losses without a PyTorch or torchvision function are written in torch as mmdet writes them
(quality focal, varifocal, distribution focal, balanced L1).
"""
import json
import math
import os
import subprocess
import sys
import time

TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
CLASSES = 80
DFL_BINS = 17


def median_ms(fn, runs=7):
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def anchor_labels(torch, n, c, bg):
    """bench_table's labels: 1 % ignored (-1), 3 % positive (class i % c), the rest `bg`."""
    i = torch.arange(n)
    r = i % 100
    labels = torch.full((n,), bg, dtype=torch.long)
    labels[(r >= 1) & (r <= 3)] = (i % c)[(r >= 1) & (r <= 3)]
    labels[r == 0] = -1
    return labels


def cases(torch, n):
    """(loss, shape, x, loss_fn(x)) of every case, inputs drawn as bench_table draws them
    (uniform logits in ±4, deltas in ±1, boxes with corners in [0, 600) and sides in [8, 200))."""
    import torch.nn.functional as F
    import torchvision.ops as tvo

    g = torch.Generator().manual_seed(0)
    u = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    c = CLASSES
    out = []

    # Sigmoid focal, dense targets in [0, 1], summed over the positives' count (torchvision).
    labels = anchor_labels(torch, n, c, c)
    num_pos = float(((labels >= 0) & (labels < c)).sum())
    x = u(n, c) * 4
    t = (u(n, c) * 0.5 + 0.5).clamp(0, 1)
    out.append(("sigmoid focal (dense)", f"{n}x{c}", x,
                lambda x, t=t: tvo.sigmoid_focal_loss(x, t, reduction="sum") / num_pos))

    # Softmax cross-entropy over 81 columns (the last the background), -1 ignored, mean.
    k = c + 1
    lab = anchor_labels(torch, n, k, k - 1)
    out.append(("softmax cross-entropy", f"{n}x{k}", u(n, k) * 4,
                lambda x: F.cross_entropy(x, lab, ignore_index=-1)))

    # Box regression on [n, 4] deltas.
    d = u(n, 4)
    dt = u(n, 4)
    out.append(("smooth L1 (β = 1/9)", f"{n}x4", d,
                lambda x: F.smooth_l1_loss(x, dt, beta=1.0 / 9.0)))

    def balanced_l1(x, alpha=0.5, gamma=1.5, beta=1.0):
        diff = (x - dt).abs()
        b = math.exp(gamma / alpha) - 1
        inner = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
        outer = gamma * diff + gamma / b - alpha * beta
        return torch.where(diff < beta, inner, outer).mean()
    out.append(("balanced L1", f"{n}x4", d.clone(), balanced_l1))

    # IoU losses on box pairs.
    def boxes():
        r = torch.rand(n, 4, generator=g)
        x1, y1 = r[:, 0] * 600, r[:, 1] * 600
        w, h = 8 + r[:, 2] * 192, 8 + r[:, 3] * 192
        return torch.stack([x1, y1, x1 + w, y1 + h], 1)
    gt = boxes()
    jit = torch.rand(n, 4, generator=g) * 2 - 1
    pred = gt + jit * torch.tensor([20.0, 20.0, 20.0, 20.0])
    pred = torch.stack([pred[:, 0], pred[:, 1], torch.maximum(pred[:, 2], pred[:, 0] + 1),
                        torch.maximum(pred[:, 3], pred[:, 1] + 1)], 1)
    out.append(("GIoU", f"{n}x4", pred.clone(),
                lambda x: tvo.generalized_box_iou_loss(x, gt, reduction="mean")))
    out.append(("CIoU", f"{n}x4", pred.clone(),
                lambda x: tvo.complete_box_iou_loss(x, gt, reduction="mean")))

    # GFL / VFNet / YOLOv8 heads, written as mmdet writes them.
    qlab = anchor_labels(torch, n, c, c).clamp(min=0)
    qlab[anchor_labels(torch, n, c, c) < 0] = c
    score = torch.rand(n, generator=g)
    qt = torch.zeros(n, c)
    pos = qlab < c
    qt[pos.nonzero().squeeze(1), qlab[pos]] = score[pos]

    def qfl(x):
        bce = F.binary_cross_entropy_with_logits(x, qt, reduction="none")
        return (bce * (qt - x.sigmoid()).abs().pow(2.0)).sum() / num_pos

    def vfl(x, alpha=0.75, gamma=2.0):
        p = x.sigmoid()
        w = qt * (qt > 0).float() + alpha * (p - qt).abs().pow(gamma) * (qt <= 0).float()
        return (F.binary_cross_entropy_with_logits(x, qt, reduction="none") * w).sum() / num_pos
    out.append(("quality focal (labels + scores)", f"{n}x{c}", u(n, c) * 4, qfl))
    out.append(("varifocal (dense)", f"{n}x{c}", u(n, c) * 4, vfl))

    rows = 4 * n
    y = (torch.rand(rows, generator=g) * (DFL_BINS - 1)).clamp(0, DFL_BINS - 1)

    def dfl(x):
        left = y.long().clamp(max=DFL_BINS - 2)
        right = left + 1
        wl = right.float() - y
        wr = y - left.float()
        return (F.cross_entropy(x, left, reduction="none") * wl
                + F.cross_entropy(x, right, reduction="none") * wr).mean()
    out.append(("distribution focal", f"{rows}x{DFL_BINS}", u(rows, DFL_BINS) * 4, dfl))
    return out


def child(n, threads, only):
    """Times every case in this process; prints one JSON list on stdout."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    res = []
    for loss, shape, x0, fn in cases(torch, n):
        if only and only not in loss:
            continue
        x = x0.clone().requires_grad_(True)

        def step():
            x.grad = None
            fn(x).backward()

        def fwd():
            with torch.no_grad():
                fn(x0)
        res.append({"loss": loss, "shape": shape, "pass": "fwd+bwd", "ms": median_ms(step)})
        res.append({"loss": loss, "shape": shape, "pass": "fwd", "ms": median_ms(fwd)})
        print(f"  {loss} {shape}: done", file=sys.stderr)
    print(json.dumps({"rows": res, "torch": torch.__version__,
                      "torchvision": torchvision.__version__}))


def main():
    args = sys.argv[1:]
    if args and args[0] == "--child":
        n, threads, only = int(args[1]), int(args[2]), args[3] if len(args) > 3 else ""
        child(n, threads, only)
        return
    if not args or args[0].startswith("--"):
        sys.exit(__doc__)
    out = args[0]
    opt = lambda name, default: args[args.index(name) + 1] if name in args else default  # noqa: E731
    n = int(opt("--anchors", 200_000))
    threads = int(opt("--threads", 2))
    only = opt("--only", "")
    runs = {}
    for label, extra in (("default", {}), ("tuned", TUNED)):
        env = {k: v for k, v in os.environ.items() if k not in TUNED}
        env.update(extra)
        print(f"torch, {label} allocator ({threads} threads, {n} anchors)", file=sys.stderr)
        p = subprocess.run([sys.executable, __file__, "--child", str(n), str(threads), only],
                           env=env, stdout=subprocess.PIPE, check=True, text=True)
        runs[label] = json.loads(p.stdout.strip().splitlines()[-1])
    rows = []
    for d, t in zip(runs["default"]["rows"], runs["tuned"]["rows"]):
        rows.append({"loss": d["loss"], "shape": d["shape"], "pass": d["pass"],
                     "torch_default_ms": d["ms"], "torch_tuned_ms": t["ms"],
                     "torch": runs["default"]["torch"],
                     "torchvision": runs["default"]["torchvision"], "threads": threads})
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print("| loss | shape | pass | torch default ms | torch tuned ms |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['loss']} | {r['shape']} | {r['pass']} | {r['torch_default_ms']:.2f} | "
              f"{r['torch_tuned_ms']:.2f} |")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
