"""Where the warps of one kernel wait, instruction by instruction, from Nsight Compute's
source page (warp stall sampling), split by warp-specialized partition.

Record and export on the GPU machine (SourceCounters samples the program counter of
every warp; the CSV has one row per SASS instruction):

    ncu --clock-control none --kernel-name regex:sparse_mla_fwd --launch-skip 2 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o prof python -m benchmarks.profile_sparse_mla
    ncu -i prof.ncu-rep --page source --csv --print-source sass > prof_sass.csv

then anywhere:

    python -m benchmarks.ncu_source prof_sass.csv [--top 30] [--ranges 50]

It prints the share of samples of each partition (a Gluon warp-specialized kernel's
worker partitions each begin with a ``USETMAXREG``, so the code is split there), the
instructions with the most samples with their top stall reasons, and with ``--ranges N``
each partition's samples over consecutive ranges of N instructions (which part of a
loop the warps spend their time in).
"""
from __future__ import annotations

import argparse
import collections
import csv


def load(path: str):
    """(header, rows, partition index of each row) of an ncu source-page CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    hdr, data = rows[1], rows[2:]
    src = hdr.index("Source")
    part, parts = 0, []
    for r in data:
        if "USETMAXREG" in r[src]:
            part += 1
        parts.append(part)
    return hdr, data, parts


def summarize(path: str, top: int = 30, ranges: int = 0) -> None:
    hdr, data, parts = load(path)
    src, samp = hdr.index("Source"), hdr.index("Warp Stall Sampling (All Samples)")
    stalls = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    n = [int(r[samp] or 0) for r in data]
    total = sum(n) or 1
    share = collections.Counter()
    for k, p in enumerate(parts):
        share[p] += n[k]
    print(f"{total} samples; by partition (code split at USETMAXREG):",
          ", ".join(f"{p}: {v / total:.1%}" for p, v in sorted(share.items()) if v / total >= 0.005))

    def reasons(ks):
        c = collections.Counter()
        for k in ks:
            for i in stalls:
                c[hdr[i][len("stall_"):]] += int(data[k][i] or 0)
        s = sum(c.values()) or 1
        return ", ".join(f"{name} {v / s:.0%}" for name, v in c.most_common(3) if v)

    print(f"\nthe {top} instructions with the most samples (row, partition, share, instruction, stalls):")
    for k in sorted(sorted(range(len(data)), key=lambda k: -n[k])[:top]):
        print(f"{k:6d} p{parts[k]} {n[k] / total:6.1%}  {data[k][src].strip()[:58]:58s} {reasons([k])}")
    if ranges:
        print(f"\nby ranges of {ranges} instructions (partitions with >= 1% of the samples):")
        for p in sorted(q for q, v in share.items() if v / total >= 0.01):
            ks = [k for k in range(len(data)) if parts[k] == p]
            for a in range(ks[0], ks[-1] + 1, ranges):
                seg = [k for k in range(a, a + ranges) if k < len(data) and parts[k] == p]
                s = sum(n[k] for k in seg)
                if s / total >= 0.002:
                    print(f"p{p} rows {a:5d}-{a + ranges - 1:5d} {s / total:6.1%}  {reasons(seg)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--ranges", type=int, default=0, help="also sum each partition over ranges of N instructions")
    args = ap.parse_args()
    summarize(args.csv, args.top, args.ranges)


if __name__ == "__main__":
    main()
