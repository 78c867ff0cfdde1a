"""Peak FLOP/s of the training device, for MFU: the dense bf16 peak of known GPUs from their data
sheets, otherwise (CPU, unknown GPU) a measured large-matmul rate in the training dtype."""

from __future__ import annotations

import time

import torch

# dense (not sparse) peak FLOP/s per GPU, bf16 / fp16 tensor cores (SXM parts)
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.1
) -> float:
    gen = torch.Generator(device=device).manual_seed(0)  # never the global RNG: resume must stay exact
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm up
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from) for one device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return flops, f"{key} bf16 data-sheet peak"
        return measured_matmul_flops(device, dtype or torch.float32, n=4096), f"measured matmul on {name}"
    return measured_matmul_flops(device), f"measured fp32 matmul, {torch.get_num_threads()} threads"
