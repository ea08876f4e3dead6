"""Tiny seeded diffusers components built in code, shared by the tests (CPU, offline)."""

from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from genalign.configs import load_config
from genalign.train_config import TrainConfig


def build_tiny_tokenizer(directory) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): enough for any lowercase prompt."""
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=24, pad_token="<|endoftext|>")


def build_tiny_pipeline(tmp_dir) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(tmp_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    # 4 blocks: 8×8 latents decode to 64×64 images, large enough for JPEG sizes to vary.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A saved tiny StableDiffusionPipeline (64×64 images, 8×8×4 latents)."""
    d = tmp_path_factory.mktemp("tiny_sd")
    tok_dir = tmp_path_factory.mktemp("tok")
    build_tiny_pipeline(tok_dir).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture(scope="session")
def sd_run_config(tiny_sd_dir):
    """Builds the TrainConfig of a tiny DDPO run on tiny_sd_dir (3 steps, 2 prompts × 2 samples
    an epoch): ``sd_run_config(output_dir, *overrides)``, later overrides winning."""

    def build(out, *extra) -> TrainConfig:
        return load_config(TrainConfig, None, [
            "policy.type=stable_diffusion", f"policy.pretrained={tiny_sd_dir}", "policy.num_steps=3",
            "prompts.source=list", "prompts.prompts=[a red circle, a blue square, a green triangle]",
            "train.prompts_per_epoch=2", "train.samples_per_prompt=2", "train.rollout_batch_size=4",
            "train.train_batch_size=2", "train.learning_rate=1e-2", "eval.prompts_per_set=2", "eval.samples_per_prompt=1",
            f"output_dir={out}", *extra,
        ])

    return build


def build_tiny_lcm_pipeline(tmp_dir, guidance_dim: int = 32) -> LatentConsistencyModelPipeline:
    """The tiny SD components with a guidance-embedded UNet (``time_cond_proj_dim``) and an LCMScheduler."""
    sd = build_tiny_pipeline(tmp_dir)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**sd.unet.config, "time_cond_proj_dim": guidance_dim})
    return LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(sd.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    """A saved tiny LatentConsistencyModelPipeline (random weights, 64×64 images, 8×8×4 latents)."""
    d = tmp_path_factory.mktemp("tiny_lcm")
    tok_dir = tmp_path_factory.mktemp("tok_lcm")
    build_tiny_lcm_pipeline(tok_dir).save_pretrained(d, safe_serialization=True)
    return str(d)


def build_tiny_video_pipeline(tmp_dir):
    """A tiny TextToVideoSDPipeline: the tiny SD text encoder and DDIM scheduler, a 2-level image
    VAE (8×8 frames <-> 4×4×4 latents) and a random UNet3DConditionModel."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    sd = build_tiny_pipeline(tmp_dir)
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    )
    unet = UNet3DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    with torch.no_grad():  # diffusers zeroes the temporal convolutions' last layers: make them matter
        for name, p in unet.named_parameters():
            if ".temp_convs." in name:
                p.normal_(0, 0.05)
    return TextToVideoSDPipeline(vae=vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=sd.scheduler)


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory):
    """A saved tiny TextToVideoSDPipeline (random weights, 8×8 frames, 4×F×4×4 latents)."""
    d = tmp_path_factory.mktemp("tiny_video")
    tok_dir = tmp_path_factory.mktemp("tok_video")
    build_tiny_video_pipeline(tok_dir).save_pretrained(d, safe_serialization=True)
    return str(d)


def build_tiny_animatediff_pipeline(tmp_dir):
    """A tiny AnimateDiffPipeline: the tiny video pipeline's text encoder, scheduler and VAE, a
    random image UNet with motion modules (frame positions in their temporal attention)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    video = build_tiny_video_pipeline(tmp_dir)
    torch.manual_seed(3)
    image_unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8)
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    with torch.no_grad():  # motion modules start as the identity: make them matter
        for name, p in unet.named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                p.normal_(0, 0.05)
    return AnimateDiffPipeline(vae=video.vae, text_encoder=video.text_encoder, tokenizer=video.tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=video.scheduler)


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory):
    """A saved tiny AnimateDiffPipeline (random weights, 8×8 frames, 4×F×4×4 latents)."""
    d = tmp_path_factory.mktemp("tiny_animatediff")
    tok_dir = tmp_path_factory.mktemp("tok_animatediff")
    build_tiny_animatediff_pipeline(tok_dir).save_pretrained(d, safe_serialization=True)
    return str(d)


def build_tiny_sd3_pipeline(tmp_dir):
    """A tiny StableDiffusion3Pipeline: two CLIP encoders with projections (no T5), a 2-block
    SD3 transformer on 8×8×4 latents (patch 2), a 64×64 VAE whose latents are shifted and scaled
    as SD3's are, and a shifted flow-matching scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    sd = build_tiny_pipeline(tmp_dir)
    torch.manual_seed(3)
    encoders = [
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(sd.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
        ))
        for _ in range(2)
    ]
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    vae = AutoencoderKL.from_config(sd.vae.config, shift_factor=0.1, scaling_factor=1.5)
    vae.load_state_dict(sd.vae.state_dict())
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=sd.tokenizer, text_encoder_2=encoders[1], tokenizer_2=sd.tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A saved tiny StableDiffusion3Pipeline (random weights, 64×64 images, 8×8×4 latents)."""
    d = tmp_path_factory.mktemp("tiny_sd3")
    tok_dir = tmp_path_factory.mktemp("tok_sd3")
    build_tiny_sd3_pipeline(tok_dir).save_pretrained(d, safe_serialization=True)
    return str(d)


@pytest.fixture(scope="session")
def tiny_tokenizer_builder():
    """The character-level tokenizer builder, for tests that assemble their own tiny models."""
    return build_tiny_tokenizer


def build_tiny_lm(directory, words, chat_template: str | None = None) -> None:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer over ``words`` saved to ``directory``:
    ``<s>`` prepended, ``</s>`` = EOS, ``<pad>`` = 0, random peaky weights (seeded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, initializer_range=0.3,  # peaky next-token distributions: EOS now and then
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_lm_builder():
    """The tiny causal LM builder, for tests that need their own vocabulary or chat template."""
    return build_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny causal LM over the words w00..w31 (see :func:`build_tiny_lm`)."""
    d = tmp_path_factory.mktemp("tiny_lm")
    build_tiny_lm(d, [f"w{i:02d}" for i in range(32)])
    return str(d)


def build_tiny_vlm(directory, seed: int = 0) -> None:
    """A random tiny Qwen2-VL (a 1-block vision tower of width 16, a 2-layer language model of
    width 32) and the Shapes VQA processor (48x48 images: 9 image tokens) saved to ``directory``."""
    from genalign.recipes.pretrain_vlm import build_model, build_processor

    processor = build_processor()
    model = build_model(processor, hidden=32, layers=2, heads=2, vision_depth=1, vision_width=16, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A saved random tiny Qwen2-VL with its processor (see :func:`build_tiny_vlm`)."""
    d = tmp_path_factory.mktemp("tiny_vlm")
    build_tiny_vlm(d)
    return str(d)
