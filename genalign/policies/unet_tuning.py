"""Glue shared by the diffusers latent-diffusion policies (Stable Diffusion, consistency
models, video, SD3-family flow models).

What is the same whichever sampler a policy runs: where a model may come from, how the
denoiser (UNet or transformer) is fine-tuned (LoRA adapters through peft, or all weights), what
the frozen reference is, how trainable weights are saved and loaded, and how images and latents
cross the VAE. The step kernels (DDIM, LCM, flow SDE) are in :mod:`genalign.policies.ddim`,
:mod:`genalign.policies.lcm` and :mod:`genalign.policies.flow_sde`, the latent shapes in
:mod:`genalign.policies.backbones`. The plain
functions on model locations and trainable state (``check_model_location``,
``portable_location``, ``trainable_state`` …) serve the text LM policy as well.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

POLICY_FILE = "genalign_policy.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_model_location(path_or_id: str, key: str) -> None:
    """A local directory must exist; anything else must look like a hub id ``org/name``."""
    if os.path.isdir(path_or_id):
        return
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(
            f"'{key}': no model directory at {path_or_id!r} (and it is not a hub id like org/name)"
        )


def check_image_size(config: Any) -> None:
    """``height``/``width`` of a latent-diffusion policy config must be whole latent cells: a
    multiple of the VAE's downsampling factor (times the transformer's patch size), read from the
    local pipeline's component configs (a hub id is checked when it loads)."""
    multiple = 8
    vae = os.path.join(config.pretrained, "vae", "config.json")
    if os.path.isfile(vae):
        with open(vae) as f:
            multiple = 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
    transformer = os.path.join(config.pretrained, "transformer", "config.json")
    if os.path.isfile(transformer):
        with open(transformer) as f:
            multiple *= int(json.load(f).get("patch_size", 1))
    for key in ("height", "width"):
        value = getattr(config, key)
        if value is not None and (value < multiple or value % multiple):
            raise ValueError(f"'{key}' must be a positive multiple of {multiple} pixels (the latent grid of "
                             f"{config.pretrained}), got {value}")


def portable_location(location: str, directory: str) -> str:
    """How a policy saved in ``directory`` records a model it sits on (base pipeline, LCM-LoRA).

    A local path is stored relative to ``directory``, always starting with ``./`` or ``../``, so
    a run folder moved or copied together with its base model still loads; a hub id is stored
    as is. :func:`resolve_location` is the inverse.
    """
    if not os.path.exists(location):
        return location
    rel = os.path.relpath(os.path.abspath(location), os.path.abspath(directory))
    return rel if rel == os.pardir or rel.startswith(os.pardir + os.sep) else os.path.join(os.curdir, rel)


def resolve_location(location: str, directory: str) -> str:
    """A model location read from the policy file in ``directory``: ``./`` or ``../`` paths are
    relative to ``directory``; absolute paths (files written before paths were relative) and hub
    ids are returned unchanged."""
    if location.startswith((os.curdir + os.sep, os.pardir + os.sep)) or location in (os.curdir, os.pardir):
        return os.path.normpath(os.path.join(directory, location))
    return location


def make_lora_config(rank: int, alpha: float | None, targets: Sequence[str]) -> LoraConfig:
    """LoRA on ``targets`` with scale alpha / r (alpha defaults to r); B starts at zero."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class DenoiserFinetune:
    """The trainable part of a diffusers pipeline: its denoiser's LoRA adapters, or all its weights.

    The denoiser is the pipeline component named ``denoiser`` (``unet`` for Stable Diffusion,
    consistency and text-to-video pipelines, ``transformer`` for SD3-family ones). The VAE and
    text encoders are frozen (in ``weight_dtype``). With LoRA the denoiser's base is frozen too
    and the reference policy is the same model with adapters disabled; with full fine-tuning the
    reference is a frozen copy of the starting weights (twice the denoiser's memory).
    ``module`` is what forward passes call: the denoiser, or its DDP/FSDP wrapper after ``prepare``.
    """

    def __init__(
        self,
        pipeline: Any,
        finetune: str,
        lora: LoraConfig,
        weight_dtype: str,
        gradient_checkpointing: bool = False,
        xformers: bool = False,
        denoiser: str = "unet",
    ):
        self.name = denoiser
        self.pipe, self.model, self.finetune, self.lora = pipeline, getattr(pipeline, denoiser), finetune, lora
        self.module: torch.nn.Module = self.model
        self.reference_model: torch.nn.Module | None = None
        dtype = DTYPES[weight_dtype]
        encoders = [getattr(pipeline, n, None) for n in TEXT_ENCODERS]
        for frozen in (pipeline.vae, *(e for e in encoders if e is not None)):
            frozen.requires_grad_(False)
            if frozen.dtype != dtype:
                frozen.to(dtype=dtype)
        if finetune == "lora":
            self.model.requires_grad_(False)
            if self.model.dtype != dtype:
                self.model.to(dtype=dtype)
            if "default" not in (getattr(self.model, "peft_config", None) or {}):
                if hasattr(self.model, "add_adapter"):
                    self.model.add_adapter(lora)
                else:  # a model without diffusers' peft mixin (UNet3DConditionModel): peft directly
                    inject_adapter_in_model(lora, self.model, adapter_name="default")
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
        else:
            self.model.requires_grad_(True)
            if self.model.dtype != torch.float32:
                self.model.to(dtype=torch.float32)
            self.reference_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if xformers:
            self.model.enable_xformers_memory_efficient_attention()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state)

    def prepare(self, accelerator: Any) -> list[torch.nn.Module]:
        self.pipe.to(accelerator.device)
        if self.reference_model is not None:
            self.reference_model.to(accelerator.device)
        self.module = accelerator.prepare_model(self.model)
        return [self.module]

    @contextmanager
    def reference(self) -> Iterator[None]:
        if self.finetune == "lora":
            set_adapters_enabled(self.model, False)
            try:
                yield
            finally:
                set_adapters_enabled(self.model, True)
            return
        saved = self.module
        self.module = self.reference_model
        try:
            yield
        finally:
            self.module = saved

    def save(self, directory: str) -> None:
        """LoRA: diffusers' LoRA format of the pipeline's class (``pipe.load_lora_weights(directory)``
        loads it). Full: the pipeline."""
        os.makedirs(directory, exist_ok=True)
        if self.finetune == "lora":
            type(self.pipe).save_lora_weights(
                directory,
                **{f"{self.name}_lora_layers": get_peft_model_state_dict(self.model),
                   f"{self.name}_lora_adapter_metadata": self.lora.to_dict()},
                safe_serialization=True,
            )
        else:
            self.pipe.save_pretrained(directory, safe_serialization=True)

    def load_lora(self, directory: str) -> None:
        """Load adapters saved by :meth:`save` into the (already added) ``default`` adapter."""
        state = type(self.pipe).lora_state_dict(directory)
        state = state[0] if isinstance(state, tuple) else state  # (state, alphas) for UNet pipelines
        prefix = f"{self.name}."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(self.model, state)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(
                f"LoRA weights in {directory} do not fit the base model: {missing[:3]}"
            )


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off (what diffusers' ``enable_adapters`` /
    ``disable_adapters`` do, for models with or without its peft mixin)."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


@torch.no_grad()
def scale_model_input(scheduler: Any, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The scheduler's model-input scaling, row by row: latents ``[N, C, h, w]``, timesteps ``[N]``.

    Every UNet call of a policy (rollout, one step, log-prob recomputation, x̂0 prediction)
    goes through this, so a recomputed log-prob sees the same model input as the rollout
    that drew the action. ``scale_model_input`` takes one timestep, so rows are grouped by
    timestep (identity for DDIM and LCM). A scheduler without one (flow matching) feeds the
    latents as they are.
    """
    if not hasattr(scheduler, "scale_model_input"):
        return latents
    first = timesteps.reshape(-1)[:1]
    if bool((timesteps == first).all()):
        return scheduler.scale_model_input(latents, timesteps[0])
    out = torch.empty_like(latents)
    for t in timesteps.unique():
        rows = timesteps == t
        out[rows] = scheduler.scale_model_input(latents[rows], t)
    return out


def _shift(vae: Any) -> float:
    """The VAE's latent shift (SD3-family VAEs centre latents as (z − shift) · scale; SD's have none)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in [0, 1]."""
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = _shift(vae)
    images = vae.decode(scaled + shift if shift else scaled).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] -> scaled latents ``[N, C, h, w]`` (the VAE posterior mean), fp32."""
    pixels = images.to(vae.device, vae.dtype) * 2 - 1
    return (vae.encode(pixels).latent_dist.mean.float() - _shift(vae)) * vae.config.scaling_factor


def merge_runtime(saved: Any, given: Any, pretrained: str, base_keys: Sequence[str]) -> Any:
    """The config of a reloaded policy: the saved adapter shape and ``base_keys`` (what the saved
    weights sit on) win; sampling settings given at load time win."""
    merged = copy.deepcopy(given) if given.pretrained else copy.deepcopy(saved)
    for key in ("finetune", "lora_rank", "lora_alpha", "lora_targets", *base_keys):
        setattr(merged, key, getattr(saved, key))
    merged.pretrained = pretrained
    return merged


def as_generators(seeds: Any, rows: int) -> list[torch.Generator] | torch.Generator | None:
    """Per-row CPU generators from the protocol's seeds (one int per row).

    diffusers-style callers may pass generators instead (one, or one per row); they are used
    as given. None: the global RNG. A list must hold one entry per row.
    """
    if seeds is None or isinstance(seeds, torch.Generator):
        return seeds
    seeds = list(seeds)
    if len(seeds) != rows:
        raise ValueError(f"need one seed per output row ({rows}), got {len(seeds)}")
    return [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(int(s)) for s in seeds]


def per_row(generators: list[torch.Generator] | torch.Generator | None, rows: int) -> list[Any]:
    """One generator (or None) per row: a single generator is shared by every row."""
    return list(generators) if isinstance(generators, list) else [generators] * rows


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of ``module``'s trainable tensors, by parameter name (any policy's module)."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s trainable tensors; a name it does not train is a KeyError."""
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - {n for n, p in params.items() if p.requires_grad})
    if unknown:
        raise KeyError(f"checkpoint has parameters this policy does not train: {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def check_branch_steps(steps: Any, batch_size: int, num_steps: int) -> torch.Tensor:
    """``continue_from``'s per-row branch steps as a ``[B]`` long CPU tensor, each in 0..T−1."""
    steps = torch.as_tensor(steps, dtype=torch.long).view(-1).cpu()
    if steps.shape != (batch_size,):
        raise ValueError(f"continue_from needs one branch step per row ([{batch_size}]), got {tuple(steps.shape)}")
    if steps.numel() and (steps.min() < 0 or steps.max() >= num_steps):
        raise IndexError(f"branch steps {steps.tolist()} outside 0..{num_steps - 1}")
    return steps
