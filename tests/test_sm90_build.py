"""The training kernels and the indexer top-k's build for sm_90 (Hopper) at the H200 block
sizes, on any machine.

The CPU interpreter runs Triton code as Python, so errors of compiled Triton (a loop-carried
variable changing type, a layout that needs more shared memory than Hopper has) only show
when the kernel is compiled. benchmarks/sm90_build.py compiles each launch for sm_90 with
the Triton installed here, in a process of its own (kernels defined under TRITON_INTERPRET=1,
as in this test session, cannot be compiled); register spills are reported there, not
judged (they differ between Triton versions).
"""
import os
import subprocess
import sys

import pytest
import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists(os.path.join(_BIN, "cuobjdump")),
                    reason="this Triton wheel has no NVIDIA backend tools")
def test_kernels_build_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "benchmarks.sm90_build", "--check"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(" shared ") >= 40, r.stdout  # every kernel of the report was built
    assert "rows_topk_kernel" in r.stdout and "indexer_select_kernel" in r.stdout, r.stdout
