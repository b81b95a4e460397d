"""
Where a CUDA training step spends its time: attention kernels alone, then the compiled step under the profiler.

Usage: uv run python dev/profile_cuda.py      (CUDA only; ~2 min on an H100)

A. forward + backward of each attention kernel at the model's shapes (B=128, T=2048, 4 heads of 128), with the
   FLOP/s of the work the mask leaves: flex attention (half and full window) and PyTorch SDPA's backends.
B. train.py's step at the default configuration, compiled, with flex attention: median step time, MFU, and the
   kernels that take the most GPU time; then the same step with SDPA for the full-context layers.
docs/performance.md quotes its output. Not a test: pytest does not collect it.
"""
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    raise SystemExit("error: dev/profile_cuda.py needs a CUDA GPU")

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402
from triton.testing import do_bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the scripts, and tests/helpers.py
import train  # noqa: E402
from helpers import build_compiled, optimizer_step  # noqa: E402

torch.set_float32_matmul_precision("high")
B, T, H, D = 128, 2048, 4, 128  # the default model's attention: 128 sequences, 4 heads of 128 channels
VOCAB = 8192
H100_PEAK = 989.5e12  # bf16 dense FLOP/s, as train.GPU_PEAK_FLOPS


def attention_flops(window):
    """Forward + backward FLOPs of the QK^T and AV products over the keys the mask leaves (backward = 2.5x)."""
    keys = sum(min(i + 1, window + 1) for i in range(T))
    return 4 * B * H * D * keys * 3.5


def bench_attention(name, fn, window):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)

    def run():
        fn(q, k, v).backward(grad)

    try:
        run()
        torch.cuda.synchronize()
        ms = do_bench(run, warmup=50, rep=300, return_mode="median")
        print(f"A {name:38s} {ms:7.2f} ms  {attention_flops(window) / ms / 1e9:6.0f} TFLOP/s", flush=True)
    except Exception as e:  # one backend failing must not hide the others
        print(f"A {name:38s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def sdpa_causal(backend):
    def fn(q, k, v):
        if backend is None:  # PyTorch's own choice
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn


def bench_step(label, backend, profile=False):
    model, optimizer, compiled = build_compiled(backend, None, VOCAB)
    torch.cuda.reset_peak_memory_stats()
    accum = train.TOTAL_BATCH_SIZE // (B * T)
    x = torch.randint(0, VOCAB, (B, T), device="cuda")
    y = torch.randint(0, VOCAB, (B, T), device="cuda")
    t0 = time.time()
    for _ in range(3):  # compilation and warm-up
        optimizer_step(model, optimizer, compiled, x, y, accum)
    torch.cuda.synchronize()
    warm = time.time() - t0
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer_step(model, optimizer, compiled, x, y, accum)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    mfu = 100 * model.estimate_flops() * train.TOTAL_BATCH_SIZE / med / H100_PEAK
    print(f"B {label:30s} step median {med * 1e3:6.1f} ms (min {times[0] * 1e3:.1f}, max {times[-1] * 1e3:.1f}) "
          f"MFU {mfu:.1f}% (H100 peak) warm-up {warm:.0f} s peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB",
          flush=True)
    if profile:  # GPU time per kernel over two steps; its sum against the wall time shows idle GPU time
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                optimizer_step(model, optimizer, compiled, x, y, accum)
            torch.cuda.synchronize()
        kernels = sorted([e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0],
                         key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in kernels)
        print(f"P total kernel time per step {total / 2 / 1e3:.1f} ms (wall median {med * 1e3:.1f} ms)")
        for e in kernels[:28]:
            print(f"P {e.self_device_time_total / 2 / 1e3:7.2f} ms/step {100 * e.self_device_time_total / total:5.1f}% "
                  f"x{e.count // 2:<4d} {e.key[:110]}")


def hybrid_attention(q, k, v, window, block_mask=None):
    """SDPA (PyTorch's choice of kernel) for the full-context layers, train.py's flex attention for the rest."""
    if window >= q.size(1) - 1:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return y.transpose(1, 2)
    return ATTENTION(q, k, v, window, block_mask)


ATTENTION = train.attention

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    # A. attention alone
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    for window in (T // 2, T):
        mask = train.make_block_mask(T, window, "cuda")
        bench_attention(f"flex compiled window {window}",
                        lambda q, k, v, mask=mask: flex_compiled(q, k, v, block_mask=mask), window)
    for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        bench_attention(f"sdpa {name} causal (window {T})", sdpa_causal(backend), T)
    torch.cuda.empty_cache()
    # B. the whole compiled step
    try:
        bench_step("flex (train.py today)", "flex", profile=True)
    except Exception:
        traceback.print_exc()
    try:
        train.attention = hybrid_attention  # CausalSelfAttention.forward looks it up at call time
        bench_step("hybrid flex S + sdpa L", "flex")
    finally:
        train.attention = ATTENTION
