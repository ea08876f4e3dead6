"""Backbones of the latent-diffusion policy: what its latents are and how they cross the VAE.

A backbone wraps a diffusers pipeline and says what is particular to its modality:

- ``latent_shape``: one sample's latents after the batch dim;
- ``decode`` / ``encode``: latents <-> outputs (what rewards see);
- the UNet, its prompt encoder and the pipeline class whose LoRA format adapters are saved in.

Everything else (the MDP, guidance, fine-tuning, the step kernel) is the policy's and does not
depend on the latent rank. :class:`ImageLatents` serves Stable Diffusion and latent consistency
pipelines (``[C, h, w]`` latents, ``[N, 3, H, W]`` images); :class:`VideoLatents` serves
text-to-video pipelines with a 3-D UNet (``[C, F, h, w]`` latents, each frame through the image
VAE, ``[N, F, 3, H, W]`` clips).
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.policies.unet_tuning import decode_latents, encode_images


class ImageLatents:
    """Latents ``[C, h, w]`` of an image pipeline (VAE downsampling ``vae_scale``)."""

    def __init__(self, pipeline: Any, height: int | None = None, width: int | None = None):
        self.pipe = pipeline
        self.unet = pipeline.unet
        self.vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.height = height or pipeline.unet.config.sample_size * self.vae_scale
        self.width = width or self.height

    def latent_shape(self) -> tuple[int, ...]:
        return (self.unet.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)

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
