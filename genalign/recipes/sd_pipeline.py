"""The tiny Stable Diffusion pipeline's parts: its word-level BPE tokenizer, freshly built or
loaded components, the assembled ``StableDiffusionPipeline`` and a labelled sample grid.

Used by :mod:`genalign.recipes.pretrain_sd` (which trains them) and
:mod:`genalign.recipes.distill_lcm` (which samples its grid prompts).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16
# Characters always in the vocabulary, so that any lowercase word still tokenizes.
BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
# Stable Diffusion v1's scheduler config; diffusers' DDIMScheduler defaults differ.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
GRID_PROMPTS = [  # train-split prompts of every tier, then one held-out composition
    "a red circle",
    "a blue square",
    "a green circle",
    "a small yellow circle",
    "a purple square",
    "a large white triangle",
    "a red circle on the left",
    "a blue square at the top",
    "a yellow triangle on the right",
    "a red circle and a blue square",
    "a yellow triangle and a green circle",
    "a red circle to the left of a blue square",
    "a green square above a purple circle",
    "two red circles",
    "three blue squares",
    "a green triangle",
]


# --------------------------------------------------------------------------- tokenizer
def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges until every word is one token; return (vocab, merges).

    Words end with CLIP's ``</w>`` suffix. Ties between equally frequent pairs break
    lexicographically, so the result depends only on the set of words.
    """
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted({w.lower() for w in words})}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in segments.values() for p in zip(s, s[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        segments = {w: _merge_pair(s, pair) for w, s in segments.items()}
    tokens = [BOS, EOS, *BASE_CHARS, *(c + "</w>" for c in BASE_CHARS)]
    tokens += [a + b for a, b in merges]
    tokens += [s[0] for s in segments.values()]  # one-letter words are already single symbols
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(directory: str | os.PathLike, words=None, max_length: int = MAX_TOKENS):
    """Write ``vocab.json``/``merges.txt`` covering ``words`` to ``directory`` and load a CLIPTokenizer.

    ``words`` defaults to ``genalign.toyworld.VOCAB``; each becomes a single token.
    bos = ``<|startoftext|>``, eos = pad = unk = ``<|endoftext|>`` as in Stable Diffusion v1.
    """
    from transformers import CLIPTokenizer

    if words is None:
        from genalign.toyworld import VOCAB as words
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_bpe(list(words))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} tokenizes to {len(ids)} tokens, expected 1")
    return tokenizer


def save_tokenizer(tokenizer, directory: str | os.PathLike, source_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained`` plus the vocab.json/merges.txt it was built from.

    The two plain files let older transformers (slow CLIPTokenizer) load it too.
    """
    tokenizer.save_pretrained(str(directory))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(source_dir) / name, Path(directory) / name)


# --------------------------------------------------------------------------- models
def _groups(channels) -> int:
    return min(32, math.gcd(*channels))


def build_components(
    tokenizer,
    *,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    vae_channels=(32, 64, 64),
    unet_channels=(64, 128),
    attention_heads: int = 4,
    size: int = 32,
    seed: int = 0,
) -> dict:
    """Build freshly initialised ``vae``, ``text_encoder``, ``unet`` and ``scheduler``.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)``; the UNet's
    ``sample_size`` is the matching latent size and its cross-attention width is
    ``text_hidden``. As in Stable Diffusion, every UNet resolution but the lowest
    cross-attends to the text, and so does the mid block.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab_size = len(tokenizer.get_vocab())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_groups(vae_channels),
        sample_size=size,
    )
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        norm_num_groups=_groups(unet_channels),
        cross_attention_dim=text_hidden,
        attention_head_dim=attention_heads,  # diffusers' name for the number of heads
    )
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )


def load_components(path: str | os.PathLike, tok_dir: str | os.PathLike) -> tuple:
    """Tokenizer and ``vae``/``text_encoder``/``unet``/``scheduler`` of a saved pipeline folder.

    The tokenizer's ``vocab.json``/``merges.txt`` are copied to ``tok_dir`` so that
    :func:`save_tokenizer` can write them beside the continued pipeline.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    missing = [f"{d}/" for d in ("vae", "text_encoder", "unet", "scheduler", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"--init {path}: not a StableDiffusionPipeline folder (missing {', '.join(missing)})")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    copy_tokenizer_source(pipe.tokenizer, path / "tokenizer", tok_dir)
    return pipe.tokenizer, dict(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet, scheduler=pipe.scheduler)


def copy_tokenizer_source(tokenizer, saved: str | os.PathLike, tok_dir: str | os.PathLike) -> None:
    """``vocab.json``/``merges.txt`` of a saved tokenizer folder ``saved`` into ``tok_dir`` (for
    :func:`save_tokenizer`); a folder with ``tokenizer.json`` only gets them written from its BPE model."""
    saved, tok_dir = Path(saved), Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if all((saved / n).is_file() for n in ("vocab.json", "merges.txt")):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(saved / name, tok_dir / name)
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"], indent=0))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def make_pipeline(components: dict, tokenizer):
    """Wrap components in a ``StableDiffusionPipeline`` without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- samples
def sample_grid(
    pipe,
    prompts: list[str],
    per_prompt: int = 4,
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    scale: int = 3,
) -> Image.Image:
    """A labelled grid: one row per prompt, ``per_prompt`` samples (DDIM, eta=0.5).

    Not eta=1: from ᾱ_T = 0 (the zero-terminal-SNR schedule) diffusers' DDIM step can round
    its noise-direction weight to the root of −6e-8 and return NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    images = pipe(
        [p for p in prompts for _ in range(per_prompt)],
        height=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        width=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        eta=0.5,
        generator=gen,
    ).images
    return labelled_grid(images, prompts, per_prompt, scale)


def labelled_grid(images: list, prompts: list[str], per_prompt: int, scale: int = 3) -> Image.Image:
    """PIL ``images`` (``per_prompt`` per prompt, prompt-major) as one row per prompt, labelled."""
    tile, label_w, pad = images[0].width * scale, 240, 2
    grid = Image.new(
        "RGB", (label_w + per_prompt * (tile + pad), len(prompts) * (tile + pad)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for row, p in enumerate(prompts):
        y = row * (tile + pad)
        draw.text((4, y + tile // 2 - 5), p or '""', fill="black")
        for col in range(per_prompt):
            img = images[row * per_prompt + col].resize((tile, tile), Image.NEAREST)
            grid.paste(img, (label_w + col * (tile + pad), y))
    return grid
