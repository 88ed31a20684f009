"""Test setup shared by all tests.

Without a GPU the Triton kernels run under the Triton interpreter, which must be
switched on before triton is first imported, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
