"""The two training stages of the tiny Stable Diffusion pipeline (:mod:`genalign.recipes.pretrain_sd`).

1. :func:`train_vae`: the autoencoder on renders, reconstruction (MSE + L1) plus a small KL
   term; :func:`latent_scaling_factor` then measures 1 / std of its latents.
2. :func:`train_unet`: UNet and text encoder jointly on the frozen VAE's latents, with caption
   dropout for classifier-free guidance, optional min-SNR weighting, optional multi-resolution
   training noise and an EMA of the weights, regressing :func:`training_target`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genalign.progress import progress

from .common import Budget, LossCurve, ShapesStream, set_lr


def train_vae(vae, stream: ShapesStream, args, log_every: int = 25) -> dict:
    """Train the autoencoder on renders; returns its log (loss curve and timings)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget = Budget(args.vae_steps, args.vae_minutes, warmup=50)
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, step = LossCurve(log_every, budget), 0
    vae.train()
    bar = progress(total=args.vae_steps, desc="vae")
    while not budget.done(step):
        set_lr(opt, args.vae_lr * budget.lr_factor(step))
        x, _ = stream.batch(args.vae_batch_size)  # [B, 3, S, S]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample  # [B, 3, S, S]
        mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the reconstruction terms
        loss = mse + l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        row = curve.add(step, dict(loss=loss.item(), mse=mse.item(), l1=l1.item(), kl=kl.item()))
        if row:
            bar.set_postfix(mse=f"{row['mse']:.4f}", kl=f"{row['kl']:.3f}")
        bar.update(1)
    bar.close()
    vae.eval()
    with torch.no_grad():
        x, _ = stream.batch(256)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        eval_mse = F.mse_loss(recon, x).item()
    return dict(steps=step, wall_s=budget.elapsed(), eval_mse=eval_mse, curve=curve.points)


@torch.no_grad()
def latent_scaling_factor(vae, stream: ShapesStream, n: int = 1024, batch: int = 128) -> float:
    """1 / std of VAE latents over ``n`` fresh renders (Stable Diffusion's recipe)."""
    gen = torch.Generator().manual_seed(1234)
    latents = [
        vae.encode(stream.batch(batch)[0]).latent_dist.sample(generator=gen)
        for _ in range(max(1, n // batch))
    ]
    return float(1.0 / torch.cat(latents).std())


class EMA:
    """Exponential moving average of parameters with diffusers' decay warm-up."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def multires_noise(shape: tuple, generator: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise ``shape`` ``[B, C, H, W]`` plus upsampled coarser noise at H/2, H/4, … 1
    pixels, level k weighted ``discount ** k``, rescaled to unit std per sample.

    At SD's largest training timestep a fraction sqrt(alpha_bar_T) = 0.07 of the image is left in
    x_T, and its low frequencies tell where objects are; a model trained with white noise can
    learn to take an object's place from that residue instead of from the prompt. Extra
    low-frequency noise hides the residue (the "multi-resolution" or pyramid noise of SD
    fine-tuning practice). On tiny-sd, 15 minutes of it did not make the model follow position
    words (the tiny-sd model card's history).
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    k = 1
    while h >> k >= 1 and w >> k >= 1:
        coarse = torch.randn((b, c, h >> k, w >> k), generator=generator)
        noise = noise + discount**k * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        k += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for ``scheduler.add_noise(latents, noise, t)``: the noise (epsilon
    prediction) or the velocity sqrt(a) * noise - sqrt(1 - a) * latents (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "epsilon":
        return noise
    raise ValueError(f"pretraining supports epsilon or v_prediction, got prediction_type={kind!r}")


def encode_images(vae, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, 4, h, w]`` (a posterior draw)."""
    return vae.encode(x).latent_dist.sample(generator=generator) * vae.config.scaling_factor


def drop_captions(prompts: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Each prompt replaced by "" with probability ``rate`` (the unconditional branch of CFG)."""
    drop = torch.rand(len(prompts), generator=generator) < rate
    return ["" if d else p for p, d in zip(prompts, drop.tolist())]


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, ema: EMA) -> None:
    """Backward, clip the gradient norm at 1, step, and update the EMA weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update()


def train_unet(unet, text_encoder, vae, tokenizer, scheduler, stream, args, log_every=25, encode=encode_images,
               text_loss=None) -> dict:
    """Train UNet and text encoder jointly on VAE latents; EMA weights are loaded at the end.

    ``stream.batch(n)`` gives (data in [-1, 1], prompts) and ``encode(vae, data, generator)`` their
    scaled latents (images by default; a video recipe passes its clip encoder). Latents may have any
    rank. ``args.freeze_text_encoder`` trains the UNet alone; ``args.multires_noise`` > 0 draws the
    training noise with :func:`multires_noise` (image latents; sampling still starts from white
    noise); ``args.warmup`` (default 100) is the learning-rate warm-up in steps; ``args.text_lr``
    (default: ``args.unet_lr``) is the text encoder's own peak learning rate. ``text_loss(prompts,
    token_ids)``, if given, is a scalar added to every step's loss (a term on the text encoder
    alone; logged as ``text``).
    """
    freeze_text, discount = args.freeze_text_encoder, args.multires_noise
    text_encoder.requires_grad_(not freeze_text)
    models = [unet] if freeze_text else [unet, text_encoder]
    params = [p for m in models for p in m.parameters()]
    text_lr = getattr(args, "text_lr", None) or args.unet_lr
    peaks = [args.unet_lr] + ([] if freeze_text else [text_lr])  # one per param group
    opt = torch.optim.AdamW([{"params": list(m.parameters()), "lr": lr} for m, lr in zip(models, peaks)], weight_decay=1e-2)
    ema = EMA(models, args.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod  # [T]
    snr = alphas_cumprod / (1 - alphas_cumprod)  # [T]
    gen = torch.Generator().manual_seed(args.seed + 2)
    ids_cache: dict[str, torch.Tensor] = {}

    def token_ids(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in ids_cache]
        if missing:
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            ids_cache.update(zip(missing, ids))
        return torch.stack([ids_cache[p] for p in prompts])  # [B, L]

    budget = Budget(args.unet_steps, args.unet_minutes, warmup=getattr(args, "warmup", 100))
    curve, step = LossCurve(log_every, budget), 0
    for m in models:
        m.train()
    bar = progress(total=args.unet_steps, desc="unet")
    while not budget.done(step):
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * budget.lr_factor(step)
        x, prompts = stream.batch(args.batch_size)
        prompts = drop_captions(prompts, args.caption_dropout, gen)
        with torch.no_grad():
            latents = encode(vae, x, gen)  # [B, 4, h, w] (images) or [B, 4, F, h, w] (clips)
        if discount > 0:
            noise = multires_noise(tuple(latents.shape), gen, discount)
        else:
            noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        text = text_encoder(token_ids(prompts))[0]  # [B, L, D]
        pred = unet(noisy, t, encoder_hidden_states=text).sample  # latents' shape
        target = training_target(scheduler, latents, noise, t)
        per_sample = F.mse_loss(pred, target, reduction="none").flatten(1).mean(dim=1)  # [B]
        weight = torch.clamp(snr[t], max=args.snr_gamma) / snr[t] if args.snr_gamma else 1.0
        loss = (weight * per_sample).mean()
        extra = {}
        if text_loss is not None:
            term = text_loss(prompts, token_ids)
            loss, extra = loss + term, {"text": term.item()}
        optimizer_step(opt, params, loss, ema)
        step += 1
        row = curve.add(step, dict(loss=loss.item(), mse=per_sample.mean().item(), **extra))
        if row:
            bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}")
        bar.update(1)
    bar.close()
    ema.copy_to_params()
    for m in models:
        m.eval()
    return dict(steps=step, wall_s=budget.elapsed(), curve=curve.points)
