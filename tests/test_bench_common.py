"""benchmarks.common's clock sampling, on the CPU: what nvidia-smi prints is parsed and summarized."""
import pytest
import torch

from benchmarks.common import ClockMonitor


def test_clock_lines_parsed_and_summarized():
    mon = ClockMonitor()
    mon.samples = ClockMonitor.parse("1980, 650.25\n1755, 700.75\n[N/A], [N/A]\n1830, 6\n17")
    assert mon.samples == [(1980.0, 650.25), (1755.0, 700.75), (1830.0, 6.0)]
    assert mon.summary() == {"sm_mhz": 1830, "sm_mhz_min": 1755, "sm_mhz_max": 1980, "power_w": 650,
                             "samples": 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU's clocks are sampled")
def test_no_samples_without_a_gpu():
    with ClockMonitor() as mon:
        pass
    assert mon.samples == [] and mon.summary() == {}
