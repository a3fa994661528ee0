"""Batched text-to-image sampling through the LoRA bank: one UNet pass serves a batch whose samples each
carry their own LoRAs and weights.

The loop is diffusers' StableDiffusionPipeline.__call__ (encode prompt, prepare latents, denoise with
classifier-free guidance, decode), with one change: routing. Each image draws from its own generator, so
it comes out the same in any batch; a test checks it against the pipeline with `set_adapters`.
Image-to-image (`init_images`, `strength`) starts from real images noised to t0 instead, as diffusers'
StableDiffusionImg2ImgPipeline does; a test checks it against that pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import diffusers
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from ..errors import RareaugError
from ..lora.bank import LoRABank
from ..models.base import vae_scale_factor

# Short names for the schedulers people ask for; any diffusers scheduler class name works too.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def make_scheduler(name: str, base_config, default_class: str):
    """`default` = the model's own sampling scheduler; else a short name or a diffusers class name."""
    class_name, extra = (default_class, {}) if name == "default" else SCHEDULERS.get(name, (name, {}))
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config") or not class_name.endswith("Scheduler"):
        raise RareaugError(f"--scheduler {name!r} is unknown; use default, {', '.join(SCHEDULERS)} "
                           "or a diffusers scheduler class name")
    return cls.from_config(base_config, **extra)


@dataclasses.dataclass
class SampleRequest:
    """One image: its prompt embedding row, adapters (bank slots) with weights, and seed."""

    a_slots: list[int]
    b_slots: list[int]
    weights: list[float]
    seed: int


class BankSampler:
    """Holds the frozen model, the bank and the encoded prompts; samples batches of requests."""

    def __init__(self, base, bank: LoRABank | None, prompt: str, guidance: float, steps: int, scheduler: str,
                 device: torch.device, resolution: int, text_bank: LoRABank | None = None):
        self.base, self.bank, self.text_bank = base, bank, text_bank
        self.guidance, self.steps, self.device = guidance, steps, device
        self.scheduler_name = scheduler
        self.scheduler_config = base.scheduler.config
        self.latent_size = resolution // vae_scale_factor(base.vae)
        # Fails early on a bad --scheduler, before anything is sampled.
        make_scheduler(scheduler, self.scheduler_config, base.sampling_scheduler)
        with torch.no_grad():
            self.cond = self._encode(prompt)
            self.uncond = self._encode("")  # no negative prompt, as the reference

    def _encode(self, text: str) -> torch.Tensor:
        tokenizer = self.base.tokenizer
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        # A text-encoder LoRA (DataDream) shapes both the prompt and the empty prompt, as in diffusers.
        routing = self.text_bank.route([0]) if self.text_bank is not None else contextlib.nullcontext()
        with routing:
            return self.base.text_encoder(ids)[0]

    @torch.no_grad()
    def sample(self, requests: list[SampleRequest], init_images: torch.Tensor | None = None,
               strength: float = 1.0) -> torch.Tensor:
        """Images (batch, 3, H, W) in [0, 1], float32, on the CPU. init_images: (batch, 3, H, W) in [0, 1] to
        start from, noised to `strength` of the schedule (image-to-image); None: from pure noise."""
        # 1. A fresh scheduler per batch: set_timesteps and multistep solvers keep state.
        scheduler = make_scheduler(self.scheduler_name, self.scheduler_config, self.base.sampling_scheduler)
        scheduler.set_timesteps(self.steps, device=self.device)
        batch = len(requests)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        unet = self.base.unet
        timesteps = scheduler.timesteps
        if init_images is None:
            # 2. Initial noise, one generator per image (diffusers' prepare_latents).
            shape = (batch, unet.config.in_channels, self.latent_size, self.latent_size)
            latents = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
            latents = latents.to(self.device) * scheduler.init_noise_sigma
        else:
            timesteps = _img2img_timesteps(scheduler, self.steps, strength)
            latents = self._noised(init_images, generators, scheduler, timesteps[:1].repeat(batch))
        embeds = torch.cat([self.uncond.expand(batch, -1, -1), self.cond.expand(batch, -1, -1)]).to(unet.dtype)
        extra = _step_kwargs(scheduler, generators)
        # 3. Denoise with classifier-free guidance; both halves carry the image's LoRA mix, as set_adapters does.
        with self._routing(requests):
            for t in timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise = unet(model_input.to(unet.dtype), t, encoder_hidden_states=embeds).sample.float()
                uncond, cond = noise.chunk(2)
                noise = uncond + self.guidance * (cond - uncond)
                latents = scheduler.step(noise, t, latents, **extra).prev_sample
        # 4. Decode.
        vae = self.base.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()

    def _noised(self, images: torch.Tensor, generators, scheduler, timestep: torch.Tensor) -> torch.Tensor:
        """The images' latents (a posterior sample each, from the image's own generator) noised to `timestep`,
        in the img2img pipeline's order of draws: every posterior sample, then the noise."""
        vae = self.base.vae
        moments = vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist.parameters
        latents = torch.cat([DiagonalGaussianDistribution(moments[i:i + 1]).sample(generator)
                             for i, generator in enumerate(generators)]).float() * vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        return scheduler.add_noise(latents, noise.to(latents.device), timestep)

    def _routing(self, requests: list[SampleRequest]):
        if self.bank is None or not requests[0].a_slots:
            return contextlib.nullcontext()
        a = [r.a_slots for r in requests] * 2  # uncond half, then cond half
        b = [r.b_slots for r in requests] * 2
        w = [r.weights for r in requests] * 2
        return self.bank.route(a, b, w)


def _img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The last `strength` of the schedule (diffusers' img2img get_timesteps): int(steps * strength) steps."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


def _step_kwargs(scheduler, generators) -> dict:
    """eta and generator where the scheduler takes them (diffusers' prepare_extra_step_kwargs)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
