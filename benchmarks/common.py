"""Shared benchmark plumbing: timing, the ceilings measured in the same run, JSON results.

Run a benchmark from the repo root as ``python -m benchmarks.<script>``; results go to
benchmarks/results/<name>.json with the device, date, versions and the exact command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events through triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class ClockMonitor:
    """The current GPU's SM clock (MHz) and board power (W), sampled by ``nvidia-smi`` every
    ``interval_ms`` while the ``with`` block runs. An H200 lowers its clock under load
    (power), by different amounts for different work, so a ratio of two throughputs is
    only read right beside the clocks each ran at. :meth:`summary` is empty where
    nvidia-smi is missing."""

    def __init__(self, interval_ms: int = 10):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self):
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            dev = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpu = visible.split(",")[dev] if visible else str(dev)  # an index or UUID nvidia-smi takes
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", gpu, "--query-gpu=clocks.sm,power.draw.instant", "--format=csv,noheader,nounits",
                 "-lms", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            torch.cuda.synchronize()
            self._proc.terminate()
            out, _ = self._proc.communicate()
            self.samples += self.parse(out)
        return False

    @staticmethod
    def parse(text: str) -> list[tuple[float, float]]:
        """(MHz, W) of each ``clocks.sm, power.draw.instant`` line nvidia-smi printed; lines cut by
        its termination or reading "[N/A]" are skipped."""
        samples = []
        for line in text.splitlines():
            try:
                mhz, watts = (float(x) for x in line.split(","))
            except ValueError:
                continue
            samples.append((mhz, watts))
        return samples

    def summary(self) -> dict:
        """sm_mhz (median), sm_mhz_min, sm_mhz_max, power_w (median), samples; {} without samples."""
        if not self.samples:
            return {}
        mhz = sorted(m for m, _ in self.samples)
        watts = sorted(w for _, w in self.samples)
        return {"sm_mhz": round(mhz[len(mhz) // 2]), "sm_mhz_min": round(mhz[0]), "sm_mhz_max": round(mhz[-1]),
                "power_w": round(watts[len(watts) // 2]), "samples": len(mhz)}


def bench_clocked(fn, warmup: int = 25, rep: int = 100) -> tuple[float, dict]:
    """:func:`bench_ms` of ``fn`` and the clocks it ran at (:class:`ClockMonitor`'s summary
    over the timing, after a first call outside it, which may compile)."""
    fn()
    torch.cuda.synchronize()
    with ClockMonitor() as mon:
        ms = bench_ms(fn, warmup=warmup, rep=rep)
    return ms, mon.summary()


def measure_ceilings(n: int = 8192, repeats: int = 3) -> dict:
    """The ceilings every benchmark reports against, measured now on this device:
    cuBLAS bf16 matmul and fp8 (e4m3, torch._scaled_mm) matmul TFLOP/s on random n^3,
    and device-to-device copy bandwidth in GB/s (bytes read + written).

    Each is timed ``repeats`` times, interleaved, and the best is reported (``*_runs``
    keep every reading): the same matmul reads several percent apart from one timing to
    the next on an H200 (power and clocks), and a low reading would flatter the ratios
    computed against it. ``<name>_sm_mhz`` is the median SM clock during the best reading
    and ``<name>_sm_mhz_runs`` during each (None where nvidia-smi is missing)."""
    dev = "cuda"
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    flops = 2 * n ** 3
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
    one = torch.ones((), device=dev)
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    cases = {
        "bf16_matmul_tflops": (lambda: a @ b, flops * 1e-9),
        "fp8_matmul_tflops": (lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                              flops * 1e-9),
        "copy_gbps": (lambda: dst.copy_(src), 2 * src.numel() * 1e-6),
    }
    runs = {k: [] for k in cases}
    clocks = {k: [] for k in cases}
    for _ in range(repeats):
        for k, (fn, work) in cases.items():
            ms, clk = bench_clocked(fn)
            runs[k].append(work / ms)
            clocks[k].append(clk.get("sm_mhz"))
    del a, b, a8, b8, src, dst, cases
    torch.cuda.empty_cache()
    out = {}
    for k, v in runs.items():
        best = max(range(repeats), key=v.__getitem__)
        out[k] = v[best]
        out[f"{k}_runs"] = [round(x, 1) for x in v]
        # the SM clock (MHz, mean) during each reading, and during the best one
        out[f"{k.rsplit('_', 1)[0]}_sm_mhz_runs"] = clocks[k]
        out[f"{k.rsplit('_', 1)[0]}_sm_mhz"] = clocks[k][best]
    return out


def cpu_name() -> str:
    """The host CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python -m " + " ".join([_module_name(sys.argv[0])] + sys.argv[1:]),
    }


def _module_name(script: str) -> str:
    """``benchmarks.bench_x`` for the script path (absolute when run with ``-m``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(script), root)
    return rel.removesuffix(".py").replace(os.sep, ".")


def write_result(name: str, payload: dict, out_dir: str | None = None) -> str:
    """Write ``{environment..., **payload}`` to ``<out_dir or benchmarks/results>/<name>.json``
    (``$OUT`` when set, so device runs bring the file back)."""
    out_dir = out_dir or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**environment(), **payload}, f, indent=1)
    return path


def kernel_table(fn, n: int = 3, top: int = 14) -> list:
    """[(name, launches a call, device us a call)] of ``fn``'s kernels, slowest first
    (torch.profiler over ``n`` calls after one warm-up call; CUDA kernels on a GPU, the
    CPU ops' self time elsewhere)."""
    import torch.profiler as tp

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with tp.profile(activities=[tp.ProfilerActivity.CUDA if cuda else tp.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if t > 0:
            rows.append((e.key[:90], e.count // n, round(t / n, 1)))
    return sorted(rows, key=lambda r: -r[2])[:top]


def host_table(fn, n: int = 3, top: int = 25) -> list:
    """[(function, calls a call, own host us a call, cumulative host us a call)] of
    ``fn``'s Python functions with the most own time (cProfile over ``n`` calls after one
    warm-up call): where an eager step spends its time on the host."""
    import cProfile
    import pstats

    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():
        where = f"{os.path.basename(path)}:{line}({name})"
        rows.append((where[:90], calls // n, round(own * 1e6 / n, 1), round(cum * 1e6 / n, 1)))
    return sorted(rows, key=lambda r: -r[2])[:top]


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def sweep_arg_parser() -> argparse.ArgumentParser:
    """Arguments shared by the kernel benchmarks that sweep variants (backward, losses)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--precompile-only", action="store_true", help="compile the variants (parallel) and exit")
    ap.add_argument("--no-precompile", action="store_true", help="skip the parallel compile step")
    ap.add_argument("--wait-for", default=None, help="after compiling, wait (<= 180 s) for this file to exist "
                    "before timing, so that other GPU work started beside this run is over")
    return ap


def wait_for(path: str | None, limit_s: float = 180.0) -> None:
    """Block until ``path`` exists (at most ``limit_s``): lets two benchmarks started in
    one device call compile in parallel and then time one after the other."""
    t0 = time.time()
    while path and not os.path.exists(path) and time.time() - t0 < limit_s:
        time.sleep(1.0)
    if path:
        print(f"waited {time.time() - t0:.0f} s for {path} (exists: {os.path.exists(path)})")


def ceilings_after_compile(args) -> dict | None:
    """The step between a sweep script's parallel compile and its timings: None when only
    compiling was asked (--precompile-only), else wait for --wait-for, then measure the
    ceilings, print them and return them."""
    if args.precompile_only:
        return None
    wait_for(args.wait_for)
    ceil = measure_ceilings()
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items() if not k.endswith("_runs")})
    return ceil
