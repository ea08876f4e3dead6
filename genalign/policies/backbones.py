"""Backbones of the latent-diffusion policy: what its latents are and how they cross the VAE.

A backbone wraps a diffusers pipeline and says what is particular to its modality:

- ``latent_shape``: one sample's latents after the batch dim;
- ``decode`` / ``encode``: latents <-> outputs (what rewards see);
- the denoiser (``denoiser``: the pipeline component fine-tuning adapts), how prompts become
  its conditioning (``encode_prompt``, ``embed_keys``) and how it is called (``forward``).

Everything else (the MDP, guidance, fine-tuning, the step kernel) is the policy's and does not
depend on the latent rank. :class:`ImageLatents` serves Stable Diffusion and latent consistency
pipelines (``[C, h, w]`` latents, ``[N, 3, H, W]`` images); :class:`VideoLatents` serves
text-to-video pipelines with a 3-D UNet (``[C, F, h, w]`` latents, each frame through the image
VAE, ``[N, F, 3, H, W]`` clips) and, as :class:`MotionLatents`, AnimateDiff pipelines (an
image UNet with motion modules); :class:`SD3Latents` serves SD3-family pipelines (an MMDiT
transformer conditioned on token and pooled prompt embeddings, ``[C, h, w]`` latents).
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.policies.unet_tuning import decode_latents, encode_images


class ImageLatents:
    """Latents ``[C, h, w]`` of a UNet image pipeline (VAE downsampling ``vae_scale``)."""

    denoiser_name = "unet"
    embed_keys: tuple[str, ...] = ("prompt_embeds",)

    def __init__(self, pipeline: Any, height: int | None = None, width: int | None = None):
        self.pipe = pipeline
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.height = height or self.denoiser.config.sample_size * self.vae_scale
        self.width = width or self.height

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)

    def encode_prompt(self, prompts: list[str], negative: list[str] | None) -> dict[str, torch.Tensor]:
        """``embed_keys`` of the prompts as the pipeline computes them (``[B, L, D]``), and with
        ``negative`` the same keys prefixed ``negative_`` for classifier-free guidance."""
        device = self.denoiser.device
        if negative is None:
            return {"prompt_embeds": self.pipe.encode_prompt(prompts, device, 1, False)[0]}
        cond, uncond = self.pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negative)
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def forward(self, module: Any, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                **extra: Any) -> torch.Tensor:
        """The denoiser's raw output for latents ``[N, ...]`` at timesteps ``[N]``; ``cond`` holds
        ``embed_keys``; ``extra`` (e.g. ``timestep_cond``) goes to the UNet as is."""
        return module(latents, t, encoder_hidden_states=cond["prompt_embeds"], **extra).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in [0, 1]."""
        return decode_latents(self.pipe.vae, latents)

    def encode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] -> scaled latents ``[N, C, h, w]`` (VAE posterior mean)."""
        return encode_images(self.pipe.vae, outputs)


class VideoLatents(ImageLatents):
    """Latents ``[C, F, h, w]`` of a text-to-video pipeline (``TextToVideoSDPipeline``'s layout);
    the VAE is an image VAE applied to every frame."""

    def __init__(self, pipeline: Any, num_frames: int, height: int | None = None, width: int | None = None):
        super().__init__(pipeline, height, width)
        self.num_frames = num_frames

    def latent_shape(self) -> tuple[int, ...]:
        c, h, w = super().latent_shape()
        return (c, self.num_frames, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, F, h, w]`` -> clips ``[N, F, 3, H, W]`` in [0, 1]."""
        n, _, f = latents.shape[:3]
        frames = super().decode(latents.transpose(1, 2).flatten(0, 1))  # [N*F, 3, H, W]
        return frames.view(n, f, *frames.shape[1:])

    def encode(self, outputs: torch.Tensor) -> torch.Tensor:
        """Clips ``[N, F, 3, H, W]`` in [0, 1] -> scaled latents ``[N, C, F, h, w]``, frame by frame."""
        if outputs.ndim != 5:
            raise ValueError(f"clips must be [N, F, 3, H, W], got {tuple(outputs.shape)}")
        n, f = outputs.shape[:2]
        z = super().encode(outputs.flatten(0, 1))  # [N*F, C, h, w]
        return z.view(n, f, *z.shape[1:]).transpose(1, 2)


class MotionLatents(VideoLatents):
    """Latents ``[C, F, h, w]`` of an AnimateDiff pipeline (``AnimateDiffPipeline``: an image UNet
    with motion modules, ``UNetMotionModel``, whose temporal attention knows each frame's
    position). Its UNet takes the prompt once per frame: ``[N*F, L, D]``."""

    def forward(self, module: Any, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                **extra: Any) -> torch.Tensor:
        text = cond["prompt_embeds"].repeat_interleave(latents.shape[2], dim=0)  # [N*F, L, D]
        return module(latents, t, encoder_hidden_states=text, **extra).sample


class SD3Latents(ImageLatents):
    """Latents ``[C, h, w]`` of an SD3-family pipeline (``StableDiffusion3Pipeline``): an MMDiT
    transformer conditioned on the prompt's token embeddings (both CLIP encoders side by side,
    then the T5 tokens, zeros when the pipeline has no T5) and its pooled CLIP embeddings.
    ``max_sequence_length``: T5 tokens per prompt (zero tokens without a T5 encoder)."""

    denoiser_name = "transformer"
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, pipeline: Any, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256):
        super().__init__(pipeline, height, width)
        self.max_sequence_length = max_sequence_length
        unit = self.vae_scale * self.denoiser.config.patch_size
        if self.height % unit or self.width % unit:
            raise ValueError(f"height and width must be multiples of {unit} (VAE factor × patch size), "
                             f"got {self.height}×{self.width}")

    def encode_prompt(self, prompts: list[str], negative: list[str] | None) -> dict[str, torch.Tensor]:
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=negative is not None, negative_prompt=negative,
            max_sequence_length=self.max_sequence_length,
        )
        embeds = {"prompt_embeds": cond, "pooled_prompt_embeds": pooled}
        if negative is not None:
            embeds.update(negative_prompt_embeds=uncond, negative_pooled_prompt_embeds=pooled_uncond)
        return embeds

    def forward(self, module: Any, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                **extra: Any) -> torch.Tensor:
        return module(hidden_states=latents, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                      pooled_projections=cond["pooled_prompt_embeds"], **extra).sample
