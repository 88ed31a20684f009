"""benchmarks/probe_probs_store.py builds kernel variants by editing the forward's source:
its edit targets must still be in that source (else the probe fails on the GPU machine),
and a variant module must run like the original."""
import torch

from benchmarks.probe_probs_store import VARIANTS, _variant_module
from flashdsa.ops import sparse_mla
from tests.utils import KERNEL_DEVICE


def test_probe_variants_build_and_the_shipped_copy_runs(tmp_path):
    mods = {name: _variant_module(name, edits, str(tmp_path)) for name, edits, _ in VARIANTS}
    q = torch.randn(3, 16, 80, device=KERNEL_DEVICE)
    kv = torch.randn(40, 1, 80, device=KERNEL_DEVICE)
    idx = torch.randint(-1, 44, (3, 1, 29), dtype=torch.int32, device=KERNEL_DEVICE)
    got = mods["as shipped"].sparse_mla_fwd(q, kv, idx, 0.2, 64, return_probs=True)
    want = sparse_mla.sparse_mla_fwd(q, kv, idx, 0.2, 64, return_probs=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
