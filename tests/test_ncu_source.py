"""benchmarks/ncu_source.py on a small source-page CSV written here (CPU)."""
import csv

from benchmarks.ncu_source import load, summarize


def _write(path, rows):
    hdr = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
           "stall_barrier", "stall_long_sb", "stall_long_sb (Not Issued)"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "k"])
        w.writerow(hdr)
        for k, (src, n, bar, lsb) in enumerate(rows):
            w.writerow([hex(k * 16), src, n, 1, bar, lsb, lsb])


def test_partitions_and_shares(tmp_path, capsys):
    p = tmp_path / "s.csv"
    _write(p, [("HGMMA.64x64x16", 30, 30, 0), ("BRA", 10, 0, 10),          # default partition
               ("USETMAXREG.DEALLOC 0x58", 0, 0, 0), ("@!P0 BRA", 60, 0, 60)])  # a worker
    _, data, parts = load(str(p))
    assert parts == [0, 0, 1, 1] and len(data) == 4
    summarize(str(p), top=2, ranges=2)
    out = capsys.readouterr().out
    assert "0: 40.0%, 1: 60.0%" in out
    assert "long_sb 100%" in out and "barrier 100%" in out
    assert "p1 rows     2-    3  60.0%" in out
