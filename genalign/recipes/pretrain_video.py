"""Pretrain the tiny text-to-video pipeline shipped in ``assets/models/tiny-video``.

The result is an ordinary diffusers text-to-video pipeline (a video UNet, ``AutoencoderKL``,
CLIP text encoder and tokenizer, DDIM scheduler) that draws 8-frame 32x32
Moving Shapes clips from prompts such as "a red circle moving right". It is made from the tiny
image pipeline (``assets/models/tiny-sd``) the way large text-to-video models are made from
image models:

- **VAE**: the image pipeline's, unchanged and frozen; every frame is encoded on its own
  (``[B, F, 3, 32, 32]`` clips <-> ``[B, 4, F, 8, 8]`` latents).
- **Scheduler**: the image pipeline's (v-prediction, zero terminal SNR, trailing timesteps).
- **Text encoder**: the image encoder's weights under a tokenizer that adds the motion words
  ("moving", "staying", "still", "up", "down") as single tokens. Rows of words both
  vocabularies share are copied, the new rows start random, and the encoder trains on.
- **UNet** (``--arch unet3d``): the image UNet inflated into a ``UNet3DConditionModel`` of the
  same widths. Every spatial weight (resnets, spatial
  attention, time embedding, in/out convolutions) is copied; the temporal layers it adds
  (temporal convolutions and temporal attention) have their output projections zeroed, so the
  untrained video model is the image model applied frame by frame. Saved as a
  ``TextToVideoSDPipeline``. Its temporal layers carry no frame positions (only the temporal
  convolutions' zero padding tells a frame where it is).
- ``--arch animatediff`` (the default and the shipped model): the image UNet, every weight
  kept, with an AnimateDiff motion module after each block (``MotionAdapter`` +
  ``UNetMotionModel``: temporal attention over the frames with sinusoidal frame positions),
  output projections zeroed likewise. Saved as an ``AnimateDiffPipeline``; the trained motion
  modules are also its ``motion_adapter``. Only this one's denoiser responds to the direction
  word within a CPU hour; its samples follow it only once the text encoder separates the
  words (``--text-separation``, ``docs/video.md``).
- ``--text-separation W``: a term on the text encoder alone that pushes apart the hidden states
  of prompts that differ only in the first object's direction word (:func:`direction_separation`).
  Trained on denoising alone, the encoder maps the four directions to nearly the same vectors
  (cosine 0.997, colour words 0.50), since the UNet does not use a word it cannot tell apart;
  with the term they end near-orthogonal and the sampled clips start to follow the word.

Every batch is fresh renders (new seeds) of train-split prompts, one object or (a
``--two-object-share`` of them) two, moving at ``--speed`` (default: the world's).
Training stops at ``--steps`` or ``--minutes``, whichever comes first (the learning-rate
schedule follows the same progress), then the pipeline is sampled on held-out and train
prompts and scored per attribute (:func:`score_clips`) for the model card. The shipped model is
three runs (the second continues the first on one-object clips, the third adds the separation
term; its card has the commands)::

    genalign toyworld pretrain video --speed 0.07 --two-object-share 0.25 --lr 5e-4 --steps 960 \
        --minutes 0 --eval-prompts 8 --out STAGE1
    genalign toyworld pretrain video --init STAGE1 --speed 0.07 --two-object-share 0 --lr 5e-4 --seed 1 \
        --steps 735 --minutes 0 --eval-prompts 48 --out STAGE2
    genalign toyworld pretrain video --init STAGE2 --speed 0.07 --two-object-share 0 --lr 5e-4 \
        --text-separation 1.0 --seed 2 --steps 600 --minutes 0 --eval-prompts 48 --out assets/models/tiny-video

The pipeline is written to a temporary folder beside ``--out`` and moved into place only when
complete, with ``training_log.json`` (the command, the loss curve and the evaluation) and
``samples.png`` (a frame strip per prompt).
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .common import (
    command_line,
    count_parameters,
    seed_everything,
    staged_folder,
    versions,
    write_training_log,
)
from .sd_pipeline import build_tokenizer, copy_tokenizer_source, save_tokenizer
from .sd_training import train_unet

PROG = "genalign toyworld pretrain video"
MOTION_WORDS = ("moving", "staying", "still", "left", "right", "up", "down")
#: Prompts of the sample strip: train prompts, then held-out colour x shape pairs.
STRIP_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a green triangle staying still",
    "a yellow circle moving down and a purple square moving left",
)


# --------------------------------------------------------------------------- components
ARCHITECTURES = ("animatediff", "unet3d")


def build_text_encoder(image: Any, tok_dir: Path, seed: int) -> tuple[Any, Any, int]:
    """The image pipeline's text encoder under a tokenizer with the motion words (module
    docstring): ``(text_encoder, tokenizer, rows copied)``."""
    from transformers import CLIPTextModel

    from genalign.toyworld import VOCAB

    words = sorted(set(VOCAB) | set(MOTION_WORDS))
    tokenizer = build_tokenizer(tok_dir, words, max_length=image.tokenizer.model_max_length)
    torch.manual_seed(seed)
    old_text = image.text_encoder
    config = old_text.config.to_dict()
    config.update(vocab_size=len(tokenizer.get_vocab()), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(type(old_text.config).from_dict(config))
    state = {k: v for k, v in old_text.state_dict().items() if "token_embedding" not in k}
    text_encoder.load_state_dict(state, strict=False)
    old_rows, new_rows = old_text.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight
    old_vocab = image.tokenizer.get_vocab()
    copied = 0
    with torch.no_grad():
        for token, i in tokenizer.get_vocab().items():
            if token in old_vocab:
                new_rows[i] = old_rows[old_vocab[token]]
                copied += 1
    return text_encoder, tokenizer, copied


def direction_separation(text_encoder: Any, margin: float = 0.5) -> Callable[..., torch.Tensor]:
    """``loss(prompts, token_ids)``: for each distinct captioned prompt, its four variants with
    the first object moving left, right, up and down are encoded, and every pair's cosine
    similarity above ``margin`` is penalised at each position from the first one where their
    tokens differ (the direction word, then the end of text and the padding the UNet also
    attends to). The mean over prompts, pairs and those positions; 0 when none is above."""
    from dataclasses import replace as replace_field

    from genalign.toyworld.moving import DIRECTIONS, parse_moving_prompt

    moving = [d for d in DIRECTIONS if d != "still"]
    pairs = torch.triu_indices(len(moving), len(moving), 1)  # [2, P]

    def loss(prompts: Sequence[str], token_ids: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        terms = []
        for prompt in dict.fromkeys(p for p in prompts if p):
            spec = parse_moving_prompt(prompt)
            first = spec.objects[0]
            variants = [replace_field(spec, objects=(replace_field(first, direction=d), *spec.objects[1:])).prompt
                        for d in moving]
            ids = token_ids(variants)  # [4, L]
            start = int((ids != ids[:1]).any(0).nonzero()[0])  # the first position where they differ
            h = torch.nn.functional.normalize(text_encoder(ids)[0][:, start:], dim=-1)  # [4, L', D]
            cos = (h[pairs[0]] * h[pairs[1]]).sum(-1)  # [P, L']
            terms.append(torch.relu(cos - margin).mean())
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    return loss


def build_motion_unet(image_unet: Any, max_frames: int = 16) -> tuple[Any, Any]:
    """AnimateDiff: the image UNet with a motion module (temporal attention with sinusoidal frame
    positions) after every block, output projections zeroed so the untrained model is the image
    model frame by frame. Returns ``(UNetMotionModel, MotionAdapter)``."""
    from diffusers import MotionAdapter, UNetMotionModel

    heads = image_unet.config.attention_head_dim  # the image UNet's head count, under SD's name for it
    if not isinstance(heads, int):
        raise ValueError(f"the image UNet has per-level head counts {heads}; the motion modules take one count")
    image_unet.register_to_config(num_attention_heads=heads)
    adapter = MotionAdapter(block_out_channels=tuple(image_unet.config.block_out_channels), motion_layers_per_block=1,
                            motion_num_attention_heads=heads, motion_norm_num_groups=image_unet.config.norm_num_groups,
                            motion_max_seq_length=max_frames, use_motion_mid_block=True)
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    zero_temporal_outputs(unet, lambda name: "motion_modules" in name)
    return unet, adapter


def sync_motion_adapter(unet: Any, adapter: Any) -> None:
    """Copy the trained motion modules of ``unet`` into ``adapter`` (saved beside the UNet, so the
    folder's adapter is the trained one and can be put on another image UNet)."""
    adapter.load_state_dict({k: v for k, v in unet.state_dict().items() if "motion_modules" in k})


class PerFrameText(torch.nn.Module):
    """A ``UNetMotionModel`` called as a 3-D UNet is: the prompt once per clip, ``[B, L, D]`` (the
    motion UNet takes it once per frame, ``[B*F, L, D]``, as ``AnimateDiffPipeline`` passes it)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0))


def trainable_unet(comps: dict[str, Any]) -> torch.nn.Module:
    """The UNet as the training loop and the probe call it (``[B, L, D]`` prompts)."""
    return PerFrameText(comps["unet"]) if comps.get("adapter") is not None else comps["unet"]


def build_video_components(image_dir: str | Path, tok_dir: Path, seed: int, arch: str = "unet3d") -> dict[str, Any]:
    """The video pipeline's parts made from the image pipeline at ``image_dir`` (module docstring)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet3DConditionModel

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown video architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    image = StableDiffusionPipeline.from_pretrained(str(image_dir), safety_checker=None, requires_safety_checker=False)
    text_encoder, tokenizer, copied = build_text_encoder(image, tok_dir, seed)
    scheduler = DDIMScheduler.from_config(image.scheduler.config)
    common = dict(vae=image.vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, copied_token_rows=copied)
    if arch == "animatediff":
        unet, adapter = build_motion_unet(image.unet)
        return dict(common, unet=unet, adapter=adapter, inflated_tensors=None)

    u2 = image.unet
    c = u2.config
    n = len(c.block_out_channels)
    image_heads = c.num_attention_heads or c.attention_head_dim
    if not isinstance(image_heads, int):
        raise ValueError(f"the image UNet has per-level head counts {image_heads}; inflation expects one count")
    unet = UNet3DConditionModel(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        cross_attention_dim=c.cross_attention_dim,
        # The image UNet's `attention_head_dim` is its number of heads (diffusers' naming quirk); the
        # 3-D UNet's is the head width, one for every level (its input transformer takes no
        # per-level widths). The width of the first level's heads keeps the image UNet's head count
        # there (the cross-attention of the down and up blocks); deeper levels get more heads.
        attention_head_dim=c.block_out_channels[0] // image_heads,
    )
    inflated = inflate_unet_state(u2.state_dict(), unet.state_dict())
    missing = unet.load_state_dict(inflated, strict=False).missing_keys
    spatial_missing = [k for k in missing if not _is_temporal(k)]
    if spatial_missing:
        raise RuntimeError(f"image UNet weights missing from the inflated UNet: {spatial_missing[:5]}")
    zero_temporal_outputs(unet)
    return dict(common, unet=unet, adapter=None, inflated_tensors=len(inflated))


def load_video_components(path: str | Path, tok_dir: Path) -> dict[str, Any]:
    """The parts of a saved text-to-video pipeline (``TextToVideoSDPipeline`` or
    ``AnimateDiffPipeline``), to train on (its tokenizer files copied to ``tok_dir``)."""
    import json

    from genalign.policies.video_diffusion import PIPELINES

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"--init {path}: not a diffusers pipeline folder (no model_index.json)")
    kind = json.loads((path / "model_index.json").read_text()).get("_class_name")
    if kind not in PIPELINES:
        raise ValueError(f"--init {path}: a {kind} folder; expected one of {', '.join(PIPELINES)}")
    pipe = PIPELINES[kind].from_pretrained(str(path), local_files_only=True)
    copy_tokenizer_source(pipe.tokenizer, path / "tokenizer", tok_dir)
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=pipe.scheduler, adapter=getattr(pipe, "motion_adapter", None), copied_token_rows=None,
                inflated_tensors=None)


def make_pipeline(comps: dict[str, Any]) -> Any:
    """The diffusers pipeline of the parts: ``AnimateDiffPipeline`` when there is a motion adapter,
    else ``TextToVideoSDPipeline``."""
    from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

    parts = {k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    if comps.get("adapter") is not None:
        return AnimateDiffPipeline(**parts, motion_adapter=comps["adapter"])
    return TextToVideoSDPipeline(**parts)


def _is_temporal(key: str) -> bool:
    return key.startswith("transformer_in.") or ".temp_convs." in key or ".temp_attentions." in key


def inflate_unet_state(image_state: dict[str, torch.Tensor], video_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image-UNet tensors under the video UNet's names: equal names and shapes copy as they are;
    a 1x1 convolution ``[C, C, 1, 1]`` becomes the linear projection ``[C, C]`` it equals."""
    out = {}
    for key, value in image_state.items():
        if key not in video_state:
            continue
        target = video_state[key].shape
        if value.shape == target:
            out[key] = value
        elif value.ndim == 4 and value.shape[2:] == (1, 1) and value.shape[:2] == target:
            out[key] = value[:, :, 0, 0]
        else:
            raise ValueError(f"image UNet tensor {key} {tuple(value.shape)} does not fit the video UNet's {tuple(target)}")
    return out


def _is_3d_temporal_attention(name: str) -> bool:
    return name == "transformer_in" or ".temp_attentions." in name


def zero_temporal_outputs(unet: torch.nn.Module, temporal: Callable[[str], bool] = _is_3d_temporal_attention) -> None:
    """Zero the output projection of every temporal attention (a module whose name ``temporal``
    accepts: by default the 3-D UNet's), so each is the identity (its residual) at the start.
    diffusers already zeroes the last layer of each temporal convolution."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if temporal(name) and name.count(".") <= 3 and hasattr(module, "proj_out"):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()


# --------------------------------------------------------------------------- data
class ClipStream:
    """Endless batches of (clips ``[B, F, 3, S, S]`` in [-1, 1], prompts) of train-split prompts,
    two-object with probability ``two_object_share``, else one-object, each rendered with a fresh seed."""

    def __init__(self, seed: int, frames: int, size: int = 32, two_object_share: float = 0.5,
                 speed: float | None = None):
        from genalign.toyworld.moving import all_moving_prompts

        self.rng = np.random.default_rng(seed)
        self.frames, self.size, self.share = frames, size, two_object_share
        self.speed = speed  # None: the world's default for the clip length
        self.pools = {1: all_moving_prompts(1, "train"), 2: all_moving_prompts(2, "train")}

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        from genalign.toyworld.moving import render_clip

        prompts, clips = [], []
        for _ in range(n):
            pool = self.pools[2 if self.rng.random() < self.share else 1]
            prompt = pool[self.rng.integers(len(pool))]
            clip = render_clip(prompt, int(self.rng.integers(0, 2**31 - 1)), frames=self.frames, size=self.size,
                               speed=self.speed)
            prompts.append(prompt)
            clips.append(clip.array())
        x = torch.from_numpy(np.stack(clips))  # [B, F, 3, S, S] in [0, 1]
        return x * 2 - 1, prompts


def encode_clips(vae: Any, clips: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """Clips ``[B, F, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, C, F, h, w]``, frame by frame."""
    b, f = clips.shape[:2]
    dist = vae.encode(clips.flatten(0, 1).to(vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    z = z.float() * vae.config.scaling_factor  # [B*F, C, h, w]
    return z.view(b, f, *z.shape[1:]).transpose(1, 2)


# --------------------------------------------------------------------------- training
def train(comps: dict[str, Any], stream: ClipStream, args: argparse.Namespace) -> dict:
    """UNet and text encoder jointly, as the image pipeline was trained (v-prediction MSE, caption
    dropout, EMA; :func:`~genalign.recipes.sd_training.train_unet`), on clip latents."""
    comps["vae"].requires_grad_(False)
    text_loss = None
    if args.text_separation > 0:
        separate = direction_separation(comps["text_encoder"])
        text_loss = lambda prompts, ids: args.text_separation * separate(prompts, ids)  # noqa: E731
    unet_args = argparse.Namespace(
        seed=args.seed, batch_size=args.batch_size, unet_steps=args.steps, unet_minutes=args.minutes, unet_lr=args.lr,
        text_lr=args.text_lr,
        caption_dropout=args.caption_dropout, ema_decay=args.ema_decay, warmup=50, snr_gamma=0.0,
        multires_noise=0.0, freeze_text_encoder=False,
    )
    return train_unet(trainable_unet(comps), comps["text_encoder"], comps["vae"], comps["tokenizer"], comps["scheduler"],
                      stream, unet_args, encode=lambda vae, x, gen: encode_clips(vae, x, gen), text_loss=text_loss)


# --------------------------------------------------------------------------- evaluation
def score_clips(clips: torch.Tensor, conditions: Sequence[dict], verifier: Any) -> list[dict[str, Any]]:
    """Per object of each clip ``[B, F, 3, H, W]`` in [0, 1]: is its colour present in every frame,
    is it drawn as its shape (the Shapes World verifier's detection of its colour, on the middle
    frame), does it move the named way (the ``motion`` verifier). ``clip`` is the clip's index."""
    from rewards.motion import MotionReward

    motion = MotionReward()(clips, list(conditions)).details
    middle = verifier.detect(clips[:, clips.shape[1] // 2])
    rows = []
    for i, (verdict, found) in enumerate(zip(motion, middle)):
        for obj in verdict["objects"]:
            same_colour = [d for d in found if d.color == obj["color"]]
            rows.append(dict(clip=i, color=obj["detected"] is not None,
                             shape=any(d.shape == obj["shape"] for d in same_colour),
                             direction=bool(obj["correct"]), wanted=obj["direction"], detected=obj["detected"]))
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Attribute accuracies over objects (rows of :func:`score_clips`), direction accuracy per wanted
    direction, and the share of clips whose every object moves the named way (the motion
    verifier's strict verdict)."""
    from genalign.toyworld.moving import DIRECTIONS

    out: dict[str, Any] = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in ("color", "shape", "direction")}
    out["direction_by_wanted"] = {d: round(float(np.mean([r["direction"] for r in rows if r["wanted"] == d])), 3)
                                  for d in DIRECTIONS if any(r["wanted"] == d for r in rows)}
    clips: dict[int, bool] = {}
    for r in rows:
        clips[r["clip"]] = clips.get(r["clip"], True) and r["direction"]
    out["clip_strict"] = round(float(np.mean(list(clips.values()))), 3)
    out["objects"] = len(rows)
    return out


@torch.no_grad()
def sample_clips(pipe: Any, prompts: list[str], seed: int, frames: int = 8, steps: int = 20, guidance: float = 5.0,
                 batch: int = 16) -> torch.Tensor:
    """Clips ``[N, F, 3, H, W]`` in [0, 1] at the pipeline's native size from plain ``pipe(...)`` (DDIM,
    eta 0.5), seeded per chunk of ``batch``."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gen = torch.Generator().manual_seed(seed + i)  # one per chunk: the pipeline's DDIM step sees [n*F, ...] rows
        video = pipe(chunk, num_frames=frames, height=size, width=size, num_inference_steps=steps,
                     guidance_scale=guidance, eta=0.5, generator=gen, output_type="pt").frames  # [n, F, 3, H, W]
        out.append(torch.as_tensor(video).float())
    return torch.cat(out).clamp(0, 1)


def evaluate(pipe: Any, verifier: Any, per_split: int, seed: int, frames: int = 8) -> dict[str, Any]:
    """Attribute accuracy on ``per_split`` fixed prompts of each split x object count."""
    from genalign.toyworld.moving import sample_moving_conditions

    result = {}
    for split in ("train", "heldout"):
        for n_obj in (1, 2):
            conds = sample_moving_conditions(n_obj, per_split, split, seed=12345, frames=frames)
            clips = sample_clips(pipe, [c["prompt"] for c in conds], seed, frames)
            result[f"{split}/{n_obj}"] = summarise(score_clips(clips, conds, verifier))
            print(f"eval {split} {n_obj} object(s): {result[f'{split}/{n_obj}']}", flush=True)
    return result


def frame_strip(clips: torch.Tensor, labels: Sequence[str], scale: int = 3) -> Image.Image:
    """One row per clip: its frames side by side, labelled."""
    n, f = clips.shape[:2]
    side, label_w, pad = clips.shape[-1] * scale, 330, 2
    strip = Image.new("RGB", (label_w + f * (side + pad), n * (side + pad)), "white")
    draw = ImageDraw.Draw(strip)
    for row in range(n):
        y = row * (side + pad)
        draw.text((4, y + side // 2 - 5), labels[row], fill="black")
        for k in range(f):
            arr = (clips[row, k].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            strip.paste(Image.fromarray(arr).resize((side, side), Image.NEAREST), (label_w + k * (side + pad), y))
    return strip


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Pretrain the tiny Moving Shapes text-to-video pipeline.")
    p.add_argument("--out", default="assets/models/tiny-video", help="output pipeline folder")
    p.add_argument("--image-model", default="assets/models/tiny-sd",
                   help="the image pipeline whose VAE, scheduler, text encoder and spatial UNet weights are reused")
    p.add_argument("--init", default=None,
                   help="continue this text-to-video pipeline folder (e.g. a shorter run of this command) instead of "
                        "inflating --image-model; every component is kept and training goes on from its weights")
    p.add_argument("--verifier", default="assets/models/shapes-verifier", help="Shapes World verifier for the shape column of the card")
    p.add_argument("--arch", choices=ARCHITECTURES, default="animatediff",
                   help="unet3d: the image UNet inflated into a UNet3DConditionModel (TextToVideoSDPipeline); "
                        "animatediff: the image UNet plus motion modules with frame positions (AnimateDiffPipeline)")
    p.add_argument("--two-object-share", type=float, default=0.5, help="share of two-object prompts in training")
    p.add_argument("--speed", type=float, default=None,
                   help="image widths per frame of a moving object in the training clips (default: the world's, 0.07 at 8 frames)")
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy, python and data")
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--batch-size", type=int, default=16, help="clips per step")
    p.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap on training")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (UNet and text encoder)")
    p.add_argument("--text-lr", type=float, default=None,
                   help="peak learning rate of the text encoder (default: --lr); the motion words start as fresh "
                        "embedding rows, and at the UNet's rate their hidden states stay nearly alike")
    p.add_argument("--text-separation", type=float, default=0.0,
                   help="weight of the text encoder's direction-separation term (0: off): the cosine of prompts that "
                        "differ only in the direction word, above 0.5, is penalised")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> '') for CFG")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the trained weights")
    p.add_argument("--eval-prompts", type=int, default=64, help="evaluation prompts per split and object count")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    """Train, evaluate and save the pipeline; returns the output folder."""
    import diffusers
    import transformers

    from rewards.shapes_verifier import ShapesVerifierReward

    args = parse_args(argv)
    t0 = time.monotonic()
    seed_everything(args.seed)
    out = Path(args.out).resolve()
    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    with staged_folder(out) as tmp:
        tok_src = tmp / "_tokenizer_src"
        comps = (load_video_components(args.init, tok_src) if args.init
                 else build_video_components(args.image_model, tok_src, args.seed, args.arch))
        log: dict = dict(
            command=command_line(PROG, argv), args=vars(args), seed=args.seed,
            versions=versions(diffusers, transformers), threads=torch.get_num_threads(),
            parameters={k: count_parameters(comps[k]) for k in ("vae", "text_encoder", "unet")},
            vocab_size=len(comps["tokenizer"].get_vocab()), copied_token_rows=comps["copied_token_rows"],
            inflated_tensors=comps["inflated_tensors"], init=args.init,
        )
        print(f"parameters: {log['parameters']}, vocab {log['vocab_size']}", flush=True)
        pipe = make_pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        stream = ClipStream(args.seed, args.frames, size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
                            two_object_share=args.two_object_share, speed=args.speed)
        log["train"] = train(comps, stream, args)
        if comps.get("adapter") is not None:
            sync_motion_adapter(comps["unet"], comps["adapter"])
        print(f"trained {log['train']['steps']} steps in {log['train']['wall_s']:.0f} s", flush=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(comps["tokenizer"], tmp / "tokenizer", tok_src)
        shutil.rmtree(tok_src)
        e0 = time.monotonic()
        log["eval"] = evaluate(pipe, verifier, args.eval_prompts, args.seed, args.frames)
        labels = list(STRIP_PROMPTS) + ["a blue circle moving left (held-out pair)"]
        clips = sample_clips(pipe, list(STRIP_PROMPTS) + ["a blue circle moving left"], args.seed, args.frames)
        frame_strip(clips, labels).save(tmp / "samples.png")
        log["eval_wall_s"] = round(time.monotonic() - e0, 1)
        write_training_log(tmp, log, t0)
    print(f"saved {out} ({log['folder_bytes'] / 1e6:.1f} MB) in {log['total_wall_s'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
