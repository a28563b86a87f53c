"""PhaseMeter measures the device a phase ran on, and names it."""

import pytest
import torch

from persian_qlora.measure import PhaseMeter


def test_a_cpu_phase_reports_its_resident_memory_and_names_the_cpu():
    with PhaseMeter(torch.device("cpu")) as meter:
        held = torch.ones(64 * 2**20 // 4)  # 64 MiB, still held when the phase ends
        held[::1024] = 2.0  # touched, so resident
    memory = meter.result.memory
    assert memory["device"] == "cpu" and "cuda_max_allocated_gb" not in memory
    assert memory["cpu_peak_rss_gb"] - memory["rss_at_start_gb"] >= 60 / 1024
    assert meter.result.peak_gb == memory["cpu_peak_rss_gb"] and meter.result.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_machine_each_phase_is_measured_where_it_ran():
    with PhaseMeter("cpu") as on_cpu:
        torch.ones(2**20)
    with PhaseMeter("cuda") as on_gpu:
        held = torch.ones(64 * 2**20 // 4, device="cuda")
    assert on_cpu.result.memory["device"] == "cpu" and "cuda_max_allocated_gb" not in on_cpu.result.memory
    assert on_gpu.result.memory["device"].startswith(f"cuda:{torch.cuda.current_device()} (")
    assert on_gpu.result.memory["cuda_max_allocated_gb"] >= 64 / 1024
    del held
