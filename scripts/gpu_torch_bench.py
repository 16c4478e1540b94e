"""PyTorch's own detection losses on the GPU, timed like bench_table (warm-up, 7 runs, median,
device synchronisation), at the sizes of `bench_table --device cuda`, for the PyTorch column of
the GPU table. Usage: python3 gpu_torch_bench.py OUT.json"""
import json
import sys
import time

import torch
import torch.nn.functional as F

try:
    import torchvision.ops as tvo
except ImportError:  # torchvision is optional
    tvo = None


def median_ms(fn, runs=7):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "torch.json"
    dev = torch.device("cuda")
    rows = []
    for n in (200_000, 1_250_000):
        c = 80
        x = torch.randn(n, c, device=dev, requires_grad=True)
        t = (torch.rand(n, c, device=dev) < 0.01).float()
        if tvo is not None:
            def focal():
                tvo.sigmoid_focal_loss(x, t, reduction="sum").backward()
            rows.append(("sigmoid focal (dense)", f"{n}x{c}", median_ms(focal)))
        xk = torch.randn(n, c + 1, device=dev, requires_grad=True)
        lab = torch.randint(0, c + 1, (n,), device=dev)

        def ce():
            F.cross_entropy(xk, lab).backward()
        rows.append(("cross-entropy", f"{n}x{c + 1}", median_ms(ce)))
        if tvo is not None:
            b1 = torch.rand(n, 4, device=dev)
            b1[:, 2:] += b1[:, :2] + 0.1
            b1.requires_grad_(True)
            b2 = torch.rand(n, 4, device=dev)
            b2[:, 2:] += b2[:, :2] + 0.1

            def giou():
                tvo.generalized_box_iou_loss(b1, b2, reduction="sum").backward()
            rows.append(("GIoU", f"{n}x4", median_ms(giou)))
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()} (fwd+bwd, f32)\n")
    print("| loss | shape | torch ms |\n|---|---|---:|")
    for name, shape, ms in rows:
        print(f"| {name} | {shape} | {ms:.3f} |")
    with open(out, "w") as f:
        json.dump([{"loss": a, "shape": b, "pass": "fwd+bwd", "torch_ms": c} for a, b, c in rows], f, indent=1)


if __name__ == "__main__":
    main()
