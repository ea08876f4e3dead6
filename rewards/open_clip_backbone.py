"""Loading an open_clip model for a reward, and CLIP preprocessing written in torch.

``model`` is an open_clip architecture name ("ViT-L-14-quickgelu" for OpenAI's weights, which
need QuickGELU — plain "ViT-L-14" silently uses GELU in open_clip ≥ 2.29) or the path of a
JSON architecture config (custom or tiny models); ``pretrained`` is an open_clip tag
("openai"), a local checkpoint file, an "hf-hub:org/repo" id, or "" for random weights
(tests only). Checkpoints load with ``weights_only=True``.

:func:`clip_preprocess` reproduces open_clip's eval transform (resize the shortest side,
bicubic, centre crop, normalise) on ``[B, 3, H, W]`` tensors in [0, 1], so gradients reach
the pixels; it agrees with the PIL path up to resampling differences (tested).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F


def load_weights_file(path: str, key: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True``
    (a ``{'state_dict': ...}`` wrapper is unwrapped); a missing file names the config key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{key}': weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _normalize(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_open_clip(model: str, pretrained: str, device: str | torch.device = "cpu") -> tuple[Any, Any, dict]:
    import open_clip

    name = model
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"'model': architecture config not found: {model!r}")
        open_clip.add_model_config(model)
        name = os.path.splitext(os.path.basename(model))[0]
    elif name not in open_clip.list_models():
        raise ValueError(f"'model': unknown open_clip architecture {model!r} (or give a path to a JSON config)")
    local = pretrained and not pretrained.startswith("hf-hub:") and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")))
    if local and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"'pretrained': checkpoint not found: {pretrained!r}")
    net = open_clip.create_model(name, pretrained=pretrained or None, device=device, weights_only=True)
    net.eval().requires_grad_(False)
    cfg = dict(getattr(net.visual, "preprocess_cfg", {}))
    size = cfg.get("size", net.visual.image_size)
    cfg["size"] = size if isinstance(size, int) else int(size[0])
    return net, open_clip.get_tokenizer(name), cfg


def clip_preprocess(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, S, S]`` (differentiable)."""
    s = cfg["size"]
    h, w = images.shape[-2:]
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - s) // 2, (nw - s) // 2
    return _normalize(x[..., top : top + s, left : left + s].clamp(0, 1), cfg)


def clip_preprocess_pad(images: torch.Tensor, cfg: dict, fill: float = 0.0) -> torch.Tensor:
    """HPS-style eval transform: resize the *longest* side to the model size (bicubic), pad the
    short side symmetrically with ``fill`` (in [0, 1] pixel units) to a square, normalise."""
    s = cfg["size"]
    h, w = images.shape[-2:]
    scale = s / max(h, w)
    nh, nw = min(s, round(h * scale)), min(s, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    pad_h, pad_w = s - nh, s - nw
    return _normalize(F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill), cfg)
