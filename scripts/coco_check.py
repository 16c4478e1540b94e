"""Scores a RetinaNet example run with pycocotools and compares with the crate's own numbers.

Usage: python scripts/coco_check.py RUN_DIR [RUN_DIR ...] [--tol 1e-4]

RUN_DIR is a `runs/<name>` folder written by `cargo run --example retinanet`: it holds
`val_gt.json` (the validation ground truth as a COCO file), `detections.json` (COCO results)
and `metrics.json` (whose "coco" "stats" are the crate's 12 COCOeval numbers). The script runs
`COCOeval(gt, dt, "bbox")` (evaluate, accumulate, summarize), prints both sets of numbers and
exits 1 when any of the 12 differs by more than --tol (or when a file is missing). An empty
`detections.json` (an untrained model scores under the 0.05 threshold) is scored as a results
set without detections.
"""
import argparse
import contextlib
import io
import json
import os
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl",
         "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def check(run_dir, tol):
    def load(name):
        path = os.path.join(run_dir, name)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"coco_check: {path}: {e}")

    gt_json, dets, metrics = load("val_gt.json"), load("detections.json"), load("metrics.json")
    ours = metrics["coco"]["stats"]
    gt = COCO()
    gt.dataset = gt_json
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets:
            dt = gt.loadRes(dets)
        else:
            # loadRes cannot take an empty list; an empty results set scores as no detection
            dt = COCO()
            dt.dataset = {"images": gt_json["images"], "categories": gt_json["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    ev.summarize()
    theirs = [float(v) for v in ev.stats]
    worst = 0.0
    print(f"{'':6} {'pycocotools':>12} {'crate':>12} {'|diff|':>10}   ({run_dir}: "
          f"{len(gt_json['images'])} images, {len(gt_json['annotations'])} boxes, "
          f"{len(dets)} detections)")
    for name, t, o in zip(NAMES, theirs, ours):
        o = float("nan") if o is None else float(o)
        d = abs(t - o)
        worst = max(worst, d) if d == d else float("inf")
        print(f"{name:6} {t:12.6f} {o:12.6f} {d:10.2e}")
    print(f"max |diff| = {worst:.3g} (tolerance {tol:g})")
    return worst <= tol


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="runs/<name> folders")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args()
    ok = all([check(r, a.tol) for r in a.runs])
    if not ok:
        print("coco_check: FAILED: the crate's COCO numbers differ from pycocotools")
        sys.exit(1)
    print("coco_check: the crate's COCO numbers equal pycocotools'")


if __name__ == "__main__":
    main()
