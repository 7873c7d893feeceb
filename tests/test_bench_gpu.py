"""``loconet bench gpu``: a clear error without CUDA, and every check of it run on the CPU (its dry run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peer.bench import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the missing-CUDA error cannot show")
@pytest.mark.timeout(120)
def test_without_cuda_the_gpu_check_is_one_line_and_exit_code_2() -> None:
    result = subprocess.run([sys.executable, "-m", "peer.cli", "bench", "gpu", "--json"],
                            capture_output=True, text=True, timeout=100, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "loconet: error: --device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False; "
        "this torch is a CPU-only build): use --device cpu or --device auto"
    ]


def test_the_peers_share_one_named_device_or_the_cpu() -> None:
    assert gpu.peer_devices(torch.device("cpu"), 3) == ["cpu", "cpu", "cpu"]
    assert gpu.peer_devices(torch.device("cuda", 1), 2) == ["cuda:1", "cuda:1"]


def test_the_peers_take_one_gpu_each_where_there_are_several(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu.peer_devices(torch.device("cuda"), 3) == ["cuda:0", "cuda:1", "cuda:0"]


def test_the_parity_tensor_holds_a_zero_a_tiny_and_a_large_block() -> None:
    x = gpu.parity_tensor(300, torch.device("cpu"))
    assert torch.equal(x[64:128], torch.zeros(64))
    assert 0 < x[128:192].abs().max() < 2.0**-100
    assert x[192:256].abs().max() > 1e3


@pytest.mark.timeout(300)
def test_the_dry_run_on_the_cpu_runs_every_check_and_passes_them() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peer.cli", "bench", "gpu", "--device", "cpu", "--steps", "20", "--numel", "4096",
         "--repeat", "1", "--json", "-q"],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["gpus"] == torch.cuda.device_count()
    assert report["encode_parity"] == {"none": True, "fp16": True, "bf16": True, "int8": True, "int4": True}
    assert report["diloco"]["identical_global_params"] is True
    assert report["diloco"]["devices"] == ["cpu", "cpu"]
    copies = report["sync_copies"]
    assert copies["time_sync_copies_over_inner_step"] == pytest.approx(
        (copies["pseudo_gradient_to_host_s"] + copies["load_s"]) / copies["inner_step_s"])
    assert set(report["encode_throughput"]) == {"int8", "int4"}


@pytest.mark.cuda
@pytest.mark.timeout(600)
def test_on_cuda_the_gpu_check_passes() -> None:
    report = gpu.run(gpu.GpuBenchConfig("cuda", peers=2, steps=50, numel=1 << 20, repeat=2))
    assert all(report["encode_parity"].values())
    assert report["diloco"]["identical_global_params"] is True
