"""Benchmark `rareaug generate`: LoFT sampling the reference way (a diffusers pipeline with every adapter of
the class loaded, `set_adapters([a, b], [0.5, 0.5])`, one image per call) against rareaug's batched bank
sampler (each image its own pair in one UNet pass), same run, same model, 50 steps, CFG 2.0, VAE decode
included on both sides.

    python bench/bench_generate.py --model sd21 --batches 16,32,64 --out bench/results/generate-$(date +%F).json
    python bench/bench_generate.py --model tiny --batches 2,4 --steps 3 --reference-images 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import device_name, emit, finish, peak_gib, reset_peak, sync  # noqa: E402  (bench/ is on sys.path)
from rareaug.device import amp_settings  # noqa: E402
from rareaug.generate import plans  # noqa: E402
from rareaug.generate.sampler import BankSampler, SampleRequest, make_scheduler  # noqa: E402
from rareaug.lora.bank import LoRABank  # noqa: E402
from rareaug.lora.files import bank_from_lora_files, to_diffusers_state  # noqa: E402

PROMPT = "a photo of a crack"








def random_lora_files(unet, n: int, folder: Path) -> list[Path]:
    """n rank-2 LoRAs with random factors (values do not change speed), saved as diffusers files."""
    from safetensors.torch import save_file

    scratch = LoRABank(copy.deepcopy(unet).to("cpu", torch.float32), n_a=n, rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in scratch.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.01)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    paths = []
    for slot in range(n):
        paths.append(folder / f"r{slot:04d}.safetensors")
        save_file(to_diffusers_state(scratch.get_slot(slot), 1.0), paths[-1])
    return paths


def reference_way(base, paths, steps, guidance, images, resolution, device) -> dict:
    pipe = base.pipeline()
    pipe.scheduler = make_scheduler("default", base.scheduler.config, base.sampling_scheduler)
    pipe.unet = copy.deepcopy(base.unet)
    pipe.set_progress_bar_config(disable=True)
    for path in paths:
        pipe.load_lora_weights(path, adapter_name=path.stem)
    plan = plans.LoftPairs([p.stem for p in paths], seed=0)
    reset_peak(device)

    def one(slot: int) -> None:
        mix = plan(slot)
        pipe.set_adapters(list(mix.loras), list(mix.weights))
        pipe(PROMPT, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator("cpu").manual_seed(slot), output_type="pt")

    one(0)  # warm-up
    sync(device)
    start = time.perf_counter()
    for slot in range(1, images + 1):
        one(slot)
    sync(device)
    seconds = time.perf_counter() - start
    result = {"images": images, "images_per_s": images / seconds, "adapters_loaded": len(paths),
              "peak_gib": peak_gib(device)}
    return result


def batched_way(base, paths, steps, guidance, batch, repeats, resolution, device, compile_blocks=False) -> dict:
    unet = copy.deepcopy(base.unet)
    bank = bank_from_lora_files(unet, paths)
    compile_seconds = None
    if compile_blocks:
        from diffusers.models.attention import BasicTransformerBlock

        for module in unet.modules():
            if isinstance(module, BasicTransformerBlock):
                module.compile(dynamic=False)
    model = copy.copy(base)
    model.unet = unet
    sampler = BankSampler(model, bank, PROMPT, guidance, steps, "default", device, resolution)
    plan = plans.LoftPairs([p.stem for p in paths], seed=0)

    def requests(offset: int) -> list[SampleRequest]:
        out = []
        for slot in range(offset, offset + batch):
            mix = plan(slot)
            ids = [int(name[1:]) for name in mix.loras]
            out.append(SampleRequest(ids, ids, list(mix.weights), plans.image_seed(0, slot, 0)))
        return out

    reset_peak(device)
    start = time.perf_counter()
    sampler.sample(requests(0))  # warm-up (and, with --compile, the compile)
    sync(device)
    if compile_blocks:
        compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for r in range(repeats):
        sampler.sample(requests((r + 1) * batch))
    sync(device)
    seconds = time.perf_counter() - start
    result = {"batch": batch, "images_per_s": batch * repeats / seconds, "peak_gib": peak_gib(device),
              "regional_compile": compile_blocks}
    if compile_seconds is not None:
        result["first_batch_with_compile_s"] = compile_seconds
    del unet, bank, sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd21", "tiny"], default="sd21")
    parser.add_argument("--batches", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per batch size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--adapters", type=int, default=16, help="LoRAs of the class (all loaded in the reference)")
    parser.add_argument("--reference-images", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time the largest batch with regional torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    amp_dtype, _ = amp_settings(device)
    dtype = amp_dtype or torch.float32
    resolution = 512 if args.model == "sd21" else 64

    info = {"what": "bench_generate", "device": device_name(device),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "model": args.model,
            "dtype": str(dtype).replace("torch.", ""), "resolution": resolution, "steps": args.steps,
            "guidance": args.guidance, "command": " ".join(sys.argv)}
    emit(info)
    base = common.build(args.model, device, dtype)
    with tempfile.TemporaryDirectory() as folder:
        paths = random_lora_files(base.unet, args.adapters, Path(folder))
        reference = reference_way(base, paths, args.steps, args.guidance, args.reference_images, resolution, device)
        emit({"reference": reference})
        batched = []
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                result = batched_way(base, paths, args.steps, args.guidance, batch, args.repeats, resolution, device)
            except torch.OutOfMemoryError:
                result = {"batch": batch, "error": "out of memory"}
                torch.cuda.empty_cache()
            emit({"batched": result})
            batched.append(result)
        compiled = None
        if args.compile:
            largest = max(b["batch"] for b in batched if "images_per_s" in b)
            compiled = batched_way(base, paths, args.steps, args.guidance, largest, args.repeats, resolution, device,
                                   compile_blocks=True)
            emit({"batched_compiled": compiled})
    best = max((b for b in batched if "images_per_s" in b), key=lambda b: b["images_per_s"])
    summary = {**info, "reference": reference, "batched": batched, "batched_compiled": compiled, "best": best,
               "speedup_vs_reference": best["images_per_s"] / reference["images_per_s"],
               "minutes_for_1000_images": 1000 / best["images_per_s"] / 60,
               "target": {"images_per_s": 5.0}}
    finish(summary, args.out)


if __name__ == "__main__":
    main()
