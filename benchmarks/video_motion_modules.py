"""Pretrain an AnimateDiff-style Moving Shapes model briefly and probe its direction words.

tiny-video (a ``UNet3DConditionModel``) ignores the direction word of its prompt
(benchmarks/video_direction_probe.py). Its temporal layers carry no frame positions, so this
script tries the other diffusers text-to-video family: tiny-sd's image UNet with AnimateDiff
motion modules (``MotionAdapter`` + ``UNetMotionModel.from_unet2d``, sinusoidal frame positions
in the temporal attention; output projections zeroed so training starts from the image model),
tiny-video's text encoder (it has the motion words), trained jointly on Moving Shapes clips with
the pretraining recipe's loss (v-prediction MSE, EMA, caption dropout), then the direction probe.

    python benchmarks/video_motion_modules.py --steps 1200        # about 25 min on 2 CPU cores

Writes ``<out>/results.json`` (the probe's table and the training curve); ``--save DIR`` keeps
the model as an ``AnimateDiffPipeline`` folder (the video policy loads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genalign.recipes.pretrain_video import ClipStream, encode_clips, load_video_components  # noqa: E402
from genalign.recipes.sd_training import train_unet  # noqa: E402


class PerFrameText(torch.nn.Module):
    """A ``UNetMotionModel`` called as a 3-D UNet is: the prompt once per clip, ``[B, L, D]``
    (the motion UNet takes it once per frame, ``[B*F, L, D]``)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> object:
        return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0))


def build(image_model: str, video_model: str, tok_dir: Path) -> dict:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    comps = load_video_components(video_model, tok_dir)
    image_unet = UNet2DConditionModel.from_pretrained(image_model, subfolder="unet")
    heads = image_unet.config.attention_head_dim  # tiny-sd names its head count there (the SD convention)
    image_unet.register_to_config(num_attention_heads=heads)
    adapter = MotionAdapter(block_out_channels=tuple(image_unet.config.block_out_channels), motion_layers_per_block=1,
                            motion_num_attention_heads=heads, motion_norm_num_groups=image_unet.config.norm_num_groups,
                            motion_max_seq_length=16, use_motion_mid_block=True)
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    with torch.no_grad():  # every motion module starts as the identity: the model starts as tiny-sd per frame
        for name, module in unet.named_modules():
            if "motion_modules" in name and name.count(".") <= 3 and hasattr(module, "proj_out"):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    return dict(comps, unet=unet, adapter=adapter)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-model", default="assets/models/tiny-sd")
    ap.add_argument("--video-model", default="assets/models/tiny-video", help="its text encoder, VAE and scheduler are used")
    ap.add_argument("--steps", type=int, default=1200, help="training steps of 16 clips")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--two-object-share", type=float, default=0.0, help="share of two-object clips in training")
    ap.add_argument("--clips", type=int, default=12, help="probe clips per direction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/video_motion_modules")
    ap.add_argument("--save", default=None, help="also save the model as an AnimateDiffPipeline folder here")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import video_direction_probe as probe

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tok_dir:
        comps = build(args.image_model, args.video_model, Path(tok_dir))
        comps["vae"].requires_grad_(False)
        unet = PerFrameText(comps["unet"])
        recipe = argparse.Namespace(
            seed=args.seed, batch_size=16, unet_steps=args.steps, unet_minutes=1e9, unet_lr=args.lr, caption_dropout=0.1,
            ema_decay=0.99, warmup=30, snr_gamma=0.0, multires_noise=0.0, freeze_text_encoder=False,
        )
        train = train_unet(unet, comps["text_encoder"], comps["vae"], comps["tokenizer"], comps["scheduler"],
                           ClipStream(args.seed, 8, two_object_share=args.two_object_share), recipe,
                           encode=lambda vae, x, gen: encode_clips(vae, x, gen))
        unet.eval()
        rows = probe.probe_components(dict(comps, unet=unet), args.clips, [300, 600, 900], args.seed)
        if args.save:
            from diffusers import AnimateDiffPipeline

            AnimateDiffPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                unet=comps["unet"], motion_adapter=comps["adapter"], scheduler=comps["scheduler"],
                                ).save_pretrained(args.save, safe_serialization=True)
    wall = time.perf_counter() - start
    print(f"motion-module model after {train['steps']} steps ({train['wall_s']:.0f} s): true phrase best (chance 0.2)")
    for t, r in rows.items():
        print(f"  t={t}: {r['true_phrase_best']:.3f}, error true/wrong {r['error_true_over_wrong']:.4f}, "
              f"by direction {r['true_phrase_best_by_direction']}")
    result = {"command": "python benchmarks/video_motion_modules.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": vars(args), "train": train, "probe": rows, "wall_s": round(wall, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
