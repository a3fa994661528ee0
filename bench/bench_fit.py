"""Benchmark `rareaug fit`: LoFT training the reference way (one peft adapter at a time, batch 1) against
the rareaug LoRA bank (N adapters per UNet pass), in the same run, on the same UNet.

Speed does not depend on weight values, so the UNet is built from the SD-2.1-base config with random
weights. Every figure is printed as one JSON line the moment it is measured; the last line is the summary.

    # the GPU benchmark (H100/H200):
    python bench/bench_fit.py --model sd21 --adapters 8,16,32,48 --out bench/results/fit-$(date +%F).json
    # a CPU smoke run of the same code path:
    python bench/bench_fit.py --model tiny --adapters 2,4 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import device_name, emit, finish, peak_gib, reset_peak, sync  # noqa: E402  (bench/ is on sys.path)
from rareaug.config import FitConfig  # noqa: E402
from rareaug.device import amp_context, amp_settings  # noqa: E402
from rareaug.lora.bank import DEFAULT_TARGETS, LoRABank  # noqa: E402
from rareaug.lora.train import Job, JobRunner, TrainData  # noqa: E402


def build_unet(model: str, device, dtype):
    base = common.build(model, device, dtype, with_vae_and_text=False)
    latent, context = (64, 1024) if model == "sd21" else (8, 32)
    return base.unet, base.scheduler, latent, context




def matmul_peak(device) -> float | None:
    """Achievable bf16 matmul TFLOP/s on this device, measured, as the yardstick for 'share of peak'."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def reference_way(unet, scheduler, latent, context, device, steps: int, warmup: int) -> dict:
    """LoFT's reference: one peft LoRA (rank 2, q/k/v/out), batch 1, AdamW, clip 1.0, bf16 autocast."""
    from peft import LoraConfig

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(DEFAULT_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    amp_dtype, _ = amp_settings(device)
    autocast = amp_context(amp_dtype)
    embeds = torch.randn(1, 77, context, device=device, dtype=unet.dtype)
    reset_peak(device)

    def step():
        latents = torch.randn(1, 4, latent, latent, device=device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        with autocast:
            pred = model(scheduler.add_noise(latents, noise, t).to(unet.dtype), t, embeds).sample
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"adapter_steps_per_s": steps / seconds, "peak_gib": peak_gib(device)}




def bank_way(unet, scheduler, latent, context, device, n: int, steps: int, warmup: int,
             checkpointing: bool = False, compile_blocks: bool = False) -> dict:
    """rareaug's path: JobRunner on a bank of n adapters, one sample each per pass (what `fit` runs)."""
    model = copy.deepcopy(unet)
    bank = LoRABank(model, n_a=n, rank=2, alpha=2.0)
    for p in bank.parameters():
        p.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    compile_seconds = None
    if compile_blocks:
        # Regional compile: each transformer block alone, fixed shapes (whole-UNet compile took > 7 min).
        from diffusers.models.attention import BasicTransformerBlock

        for module in model.modules():
            if isinstance(module, BasicTransformerBlock):
                module.compile(dynamic=False)
    data = TrainData([f"r{i:04d}" for i in range(n)],
                     torch.cat([torch.randn(n, 4, latent, latent), torch.full((n, 4, latent, latent), -4.0)],
                               1).to(device),
                     torch.randn(n, 77, context).to(device), 0.18215)
    total = warmup + steps
    config = FitConfig(method="loft", steps=total, rank=2, alpha=2.0, lr=1e-3, samples_per_step=1,
                       checkpoint_every=10**9)
    marks = []
    runner = JobRunner(model, bank, scheduler, data, config, 0, device, n, Path("/nonexistent-no-checkpoints"),
                       on_step=lambda job, step, k: (sync(device), marks.append(time.perf_counter())))
    reset_peak(device)
    start = time.perf_counter()
    runner.run(Job("loft", "bench", data.ids, list(range(n))))
    if compile_blocks:
        compile_seconds = marks[0] - start
    seconds = marks[-1] - marks[warmup - 1] if warmup else marks[-1] - start
    result = {"adapters": n, "adapter_steps_per_s": n * steps / seconds, "peak_gib": peak_gib(device),
              "gradient_checkpointing": checkpointing, "regional_compile": compile_blocks}
    if compile_seconds is not None:
        result["first_step_with_compile_s"] = compile_seconds
    del model, bank, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def flops_per_adapter_step(unet, latent, context, device) -> float:
    """Counted, not assumed: forward + backward of one bank sample (frozen base: no weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(unet)
    bank = LoRABank(model, n_a=1, rank=2, alpha=2.0)
    for p in bank.parameters():
        p.requires_grad_(True)
    x = torch.randn(1, 4, latent, latent, device=device, dtype=unet.dtype)
    embeds = torch.randn(1, 77, context, device=device, dtype=unet.dtype)
    amp_dtype, _ = amp_settings(device)
    autocast = amp_context(amp_dtype)
    with FlopCounterMode(display=False) as counter, bank.route([0]), autocast:
        model(x, torch.tensor([500], device=device), embeds).sample.float().pow(2).mean().backward()
    del model, bank
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd21", "tiny"], default="sd21")
    parser.add_argument("--adapters", default="8,16,32", help="bank sizes to time, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference-steps", type=int, default=30)
    parser.add_argument("--checkpointed", type=int, default=16,
                        help="bank size timed with gradient checkpointing (24 GB cards)")
    parser.add_argument("--compile", action="store_true", help="also time the largest bank with regional torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp_dtype, _ = amp_settings(device)
    dtype = amp_dtype or torch.float32

    info = {"what": "bench_fit", "device": device_name(device),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "model": args.model,
            "dtype": str(dtype).replace("torch.", ""), "command": " ".join(sys.argv)}
    emit(info)
    unet, scheduler, latent, context = build_unet(args.model, device, dtype)
    peak = matmul_peak(device)
    emit({"matmul_bf16_tflops_measured": peak})
    flops = flops_per_adapter_step(unet, latent, context, device)
    emit({"flops_per_adapter_step": flops})

    reference = reference_way(unet, scheduler, latent, context, device, args.reference_steps, args.warmup)
    emit({"reference": reference})
    banks = []
    for n in [int(v) for v in args.adapters.split(",")]:
        try:
            result = bank_way(unet, scheduler, latent, context, device, n, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            result = {"adapters": n, "error": "out of memory"}
            torch.cuda.empty_cache()
        if peak and "adapter_steps_per_s" in result:
            result["share_of_measured_matmul_peak"] = result["adapter_steps_per_s"] * flops / (peak * 1e12)
        emit({"bank": result})
        banks.append(result)
    checkpointed = bank_way(unet, scheduler, latent, context, device, args.checkpointed, args.steps, args.warmup,
                            checkpointing=True)
    emit({"bank_checkpointed": checkpointed})
    compiled = None
    if args.compile:
        largest = max(b["adapters"] for b in banks if "adapter_steps_per_s" in b)
        compiled = bank_way(unet, scheduler, latent, context, device, largest, args.steps, args.warmup,
                            compile_blocks=True)
        emit({"bank_compiled": compiled})

    best = max((b for b in banks if "adapter_steps_per_s" in b), key=lambda b: b["adapter_steps_per_s"])
    speedup = best["adapter_steps_per_s"] / reference["adapter_steps_per_s"]
    summary = {**info, "matmul_bf16_tflops_measured": peak, "flops_per_adapter_step": flops,
               "reference": reference, "bank": banks, "bank_checkpointed": checkpointed, "bank_compiled": compiled,
               "best": best, "speedup_vs_reference": speedup,
               "minutes_for_50_images_x_600_steps": 50 * 600 / best["adapter_steps_per_s"] / 60,
               "target": {"adapter_steps_per_s": 150, "speedup": 15, "fits_24gb": True},
               "fits_24gb": checkpointed["peak_gib"] is not None and checkpointed["peak_gib"] < 22.0}
    finish(summary, args.out)


if __name__ == "__main__":
    main()
