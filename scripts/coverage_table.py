#!/usr/bin/env python3
"""The README's table of CUDA kernels and the test files that ran them, from the coverage file
of a run of the emulated suite (`CANDLE_DETLOSS_EMU_COVERAGE=FILE cargo test --release
--features cuda-emu`, lines `kernel<TAB>program`).

    python3 scripts/coverage_table.py FILE

The counts are those of the kernels that ran; `tests/emu_coverage.rs --ignored` checks that
every registered kernel is among them, so on a passing run they are the registered ones.
"""
import re
import sys
from collections import defaultdict

DT = r"(f32|f64|f16|bf16)"
TG = r"(dense|u32|i64|densei64)"
ROWS = [
    ("`ap_bucket_{dt}_{tg}`", rf"ap_bucket_{DT}_{TG}"),
    ("`ap_compact_{dt}_{tg}`", rf"ap_compact_{DT}_{TG}"),
    ("`ap_count_{dt}_{tg}`", rf"ap_count_{DT}_{TG}"),
    ("`ap_update_{dt}_{tg}`", rf"ap_update_{DT}_{TG}"),
    ("`{smooth,balanced}_l1_bwd_{dt}`", rf"(smooth|balanced)_l1_bwd_{DT}"),
    ("`{smooth,balanced}_l1_fwd_none_{dt}`", rf"(smooth|balanced)_l1_fwd_none_{DT}"),
    ("`{smooth,balanced}_l1_fwd_partial_{dt}`", rf"(smooth|balanced)_l1_fwd_partial_{DT}"),
    ("`box_{iou,giou,diou,ciou}_bwd_{dt}`", rf"box_(iou|giou|diou|ciou)_bwd_{DT}"),
    ("`box_{iou,giou,diou,ciou}_fwd_none_{dt}`", rf"box_(iou|giou|diou|ciou)_fwd_none_{DT}"),
    ("`box_{iou,giou,diou,ciou}_fwd_partial_{dt}`", rf"box_(iou|giou|diou|ciou)_fwd_partial_{DT}"),
    ("`dfl_{fwd_none,fwd_partial,bwd,bwd_target}_{dt}`", rf"dfl_(fwd_none|fwd_partial|bwd|bwd_target)_{DT}"),
    ("`finalize_{dt}`", rf"finalize_{DT}"),
    ("`ghmc_bwd_{dt}_{tg}`", rf"ghmc_bwd_{DT}_{TG}"),
    ("`ghmc_fwd_none_{dt}_{tg}`", rf"ghmc_fwd_none_{DT}_{TG}"),
    ("`ghmc_fwd_partial_{dt}_{tg}`", rf"ghmc_fwd_partial_{DT}_{TG}"),
    ("`ghmc_hist_{dt}_{tg}`", rf"ghmc_hist_{DT}_{TG}"),
    ("`quality_{fwd_none,fwd_partial,bwd,tbwd}_{dt}_{tg}`", rf"quality_(fwd_none|fwd_partial|bwd|tbwd)_{DT}_{TG}"),
    ("`sigmoid_focal_bwd_{dt}_{tg}`", rf"sigmoid_focal_bwd_{DT}_{TG}"),
    ("`sigmoid_focal_count_{tg}`", rf"sigmoid_focal_count_{TG}"),
    ("`sigmoid_focal_fwd_none_{dt}_{tg}`", rf"sigmoid_focal_fwd_none_{DT}_{TG}"),
    ("`sigmoid_focal_fwd_partial_{dt}_{tg}`", rf"sigmoid_focal_fwd_partial_{DT}_{TG}"),
    ("`sigmoid_focal_tbwd_{dt}` (dense targets' gradient)", rf"sigmoid_focal_tbwd_{DT}"),
    ("`softmax_bwd_{dt}_{tg}_s{0,1}_{warp,block}`", rf"softmax_bwd_{DT}_{TG}_s[01]_(warp|block)"),
    ("`softmax_den_{dt}_{tg}`", rf"softmax_den_{DT}_{TG}"),
    ("`softmax_fwd_{dt}_{tg}_s{0,1}_{warp,block}`", rf"softmax_fwd_{DT}_{TG}_s[01]_(warp|block)"),
    ("`softmax_prob_{fwd,bwd}_{dt}_{warp,block}` (probability targets)", rf"softmax_prob_(fwd|bwd)_{DT}_(warp|block)"),
]


def program(p):
    p = re.sub(r"-[0-9a-f]{16}$", "", p)
    return {"rust_out": "doctests", "candle_detloss": "unit tests"}.get(p, f"`{p}`")


def main(path):
    ran = defaultdict(set)
    for line in open(path):
        kernel, _, prog = line.rstrip("\n").partition("\t")
        if kernel != "emu_selftest":
            ran[kernel].add(program(prog))
    rows, matched = [], set()
    for label, pat in ROWS:
        ks = sorted(k for k in ran if re.fullmatch(pat, k))
        matched.update(ks)
        progs = sorted(set().union(*(ran[k] for k in ks)), key=lambda s: s.strip("`"))
        rows.append(f"| {label} | {len(ks)} | {', '.join(progs)} |")
    rest = sorted(set(ran) - matched)
    if rest:
        sys.exit(f"kernels in no row: {rest}")
    print(f"{len(matched)} kernels\n")
    print("| kernels | ran | test files (`tests/*.rs`) that ran them |")
    print("|---|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1])
