"""A Qwen2-VL vision-language model as a policy over token decoding.

The text LM policy (:mod:`genalign.policies.text_lm`) with images in the prompt: a condition is
a dict with a ``"prompt"`` (the question) and an optional ``"image"`` (a PIL image) or
``"images"`` (a list); it is rendered through the processor's chat template as one user turn
(image placeholders, then the question) with the assistant turn opened. A condition without an
image is a text-only prompt. State s_j = (images, prompt, response tokens before j), action a_j
= token j, π(a_j | s_j) = softmax(logits / temperature) over the action set: the vision tokens
(image and video pads, vision start and end) are outside it, never drawn and at probability 0
in the scored distribution, the same masked softmax when sampling and in ``log_prob``.

Each row's image patches (``pixel_values`` ``[patches_b, D]``) and grids (``image_grid_thw``
``[images_b, 3]``) travel in the trajectory as :class:`~genalign.trajectory.Ragged` extras.
Rotary positions are multimodal (:func:`mrope_positions`), computed here from the ids and the
grids and always passed to the model, so no position state is kept on the model between calls.

The vision tower is frozen by default; LoRA adapters go on the language model's attention
projections only (the reference is the model with adapters disabled), or everything but the
vision tower trains (``finetune: full``, the reference a frozen copy). Saved LoRA policies are
peft adapter folders with the processor and the genalign policy file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel

from genalign.conditions import condition_text
from genalign.configs import opt
from genalign.policies.text_lm import TextLMPolicy, TextLMPolicyConfig
from genalign.policies.unet_tuning import (
    DTYPES,
    POLICY_FILE,
    check_model_location,
    merge_runtime,
    portable_location,
    resolve_location,
)
from genalign.trajectory import Ragged, Trajectory

__all__ = ["VLMPolicy", "VLMPolicyConfig", "condition_images", "mrope_positions"]

#: the per-row image inputs kept in ``Trajectory.extras``
MEDIA_KEYS = ("pixel_values", "image_grid_thw")


@dataclass
class VLMPolicyConfig:
    type: Literal["vlm"] = opt("vlm", "policy kind")
    pretrained: str = opt("", "local directory or hub id of a Qwen2-VL model and its processor (or a genalign policy dir)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    max_new_tokens: int = opt(16, "longest response in tokens (the horizon T of `start` / `step`)")
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are those of softmax(logits / temperature) over the action set")
    top_p: float = opt(1.0, "nucleus sampling mass in (0, 1]; < 1 forces `recompute_log_probs` (the draw is not the scored distribution)")
    stop_strings: list[str] = opt([], "a response ends after the token that completes one of these (cut from the decoded text)")
    finetune: Literal["lora", "full"] = opt("lora", "train LoRA adapters, or all weights (the vision tower only with `train_vision`)")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float | None = opt(None, "LoRA alpha (scale = alpha / r); default: equal to the rank")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "language-model module names that get LoRA adapters (never a vision-tower module)")
    train_vision: bool = opt(False, "train the vision tower too (LoRA: adapters on its `vision_lora_targets`; full: all its weights)")
    vision_lora_targets: list[str] = opt(["qkv", "proj"], "vision-tower module names that get LoRA adapters when `train_vision` is true")
    weight_dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "dtype of the frozen base weights (LoRA); trainable weights stay float32"
    )
    trust_remote_code: bool = opt(False, "allow the model's own code from its folder or the hub (never read from a saved policy)")
    recompute_log_probs: bool = opt(False, "recompute rollout log-probs with a teacher-forced forward pass after sampling")

    def validate(self) -> None:
        if not self.pretrained:
            raise ValueError("'pretrained' is required: a local model directory or a hub id")
        check_model_location(self.pretrained, "pretrained")
        self.check_sampling()

    def check_sampling(self) -> None:
        """The checks that do not need a model location (those of the text LM, and the targets)."""
        TextLMPolicyConfig.check_sampling(self)  # type: ignore[arg-type]  # the same fields
        if self.finetune == "lora" and not self.lora_targets:
            raise ValueError("'lora_targets' is empty: name the language-model modules that get adapters")
        if self.finetune == "lora" and self.train_vision and not self.vision_lora_targets:
            raise ValueError("'vision_lora_targets' is empty but 'train_vision' is true")

    @property
    def recompute(self) -> bool:
        """Whether rollout log-probs are recomputed teacher-forced (asked for, or top-p sampling)."""
        return self.recompute_log_probs or self.top_p < 1


def condition_images(condition: Any) -> list[Any]:
    """The images of a condition: ``condition["images"]`` (a list), ``condition["image"]``, or
    the same attributes of an object; none for a string or a condition without one."""
    get = condition.get if isinstance(condition, dict) else lambda k: getattr(condition, k, None)
    if isinstance(condition, str):
        return []
    images = get("images")
    if images is not None:
        return list(images)
    image = get("image")
    return [] if image is None else [image]


def mrope_positions(ids: torch.Tensor, mask: torch.Tensor, grids: Sequence[torch.Tensor], image_token_id: int,
                    merge: int) -> torch.Tensor:
    """Qwen2-VL's multimodal rotary positions ``[3, N, L]`` (temporal, height, width) of
    left-padded sequences ``ids`` ``[N, L]`` with attention ``mask`` ``[N, L]``.

    Over each row's real tokens: a text token gets the current position p in all three
    components and moves p to p + 1. The k-th run of image tokens is image k of the row
    (``grids[row][k]`` = (t, h, w) patches, ``(h / merge) * (w / merge)`` tokens per frame, in
    row-major order): the token at (i, y, x) gets (p + i, p + y, p + x), then p moves to
    p + max(h, w) / merge. Padding gets 0. After the prefix every new token is text, so the next
    position is the last + 1 in each component.
    """
    n, length = ids.shape
    device = ids.device
    out = torch.zeros(3, n, length, dtype=torch.long)
    ids, mask = ids.cpu(), mask.cpu().bool()
    for row in range(n):
        seq = ids[row][mask[row]]
        is_image = (seq == image_token_id).tolist()
        grid = grids[row].cpu().tolist() if len(grids[row]) else []
        pos_rows: list[torch.Tensor] = []
        p, i, k = 0, 0, 0
        while i < len(seq):
            if is_image[i]:
                if k >= len(grid):
                    raise ValueError(f"row {row} has more image token runs than images ({len(grid)})")
                t, h, w = grid[k][0], grid[k][1] // merge, grid[k][2] // merge
                count = t * h * w
                if not all(is_image[i:i + count]) or (i + count < len(seq) and is_image[i + count]):
                    raise ValueError(f"row {row}: image {k} needs {count} consecutive image tokens (grid {grid[k]})")
                tt = torch.arange(t).repeat_interleave(h * w)
                hh = torch.arange(h).repeat_interleave(w).repeat(t)
                ww = torch.arange(w).repeat(t * h)
                pos_rows.append(torch.stack([tt, hh, ww]) + p)
                p += max(h, w)
                i += count
                k += 1
            else:
                j = i
                while j < len(seq) and not is_image[j]:
                    j += 1
                pos_rows.append(torch.arange(p, p + j - i).unsqueeze(0).expand(3, -1))
                p += j - i
                i = j
        if k != len(grid):
            raise ValueError(f"row {row} has {len(grid)} images but {k} image token runs")
        if pos_rows:
            out[:, row, mask[row]] = torch.cat(pos_rows, 1)
    return out.to(device)


class VLMPolicy(TextLMPolicy):
    """A Qwen2-VL ``...ForConditionalGeneration`` (with its processor) behind the Policy protocol."""

    def __init__(self, model: Any, processor: Any, config: VLMPolicyConfig):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        self.processor = processor
        self.vision_prefix = _vision_prefix(base)
        cfg = base.config
        self.image_token_id = int(cfg.image_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        v = cfg.vision_config
        self.patch_dim = int(v.in_channels * v.temporal_patch_size * v.patch_size**2)
        super().__init__(model, processor.tokenizer, config)
        vision_ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        self.banned_tokens = torch.tensor(sorted(int(i) for i in vision_ids if i is not None), dtype=torch.long)
        if config.finetune == "full":
            self._base().get_submodule(self.vision_prefix).requires_grad_(config.train_vision)

    def lora_config(self) -> LoraConfig:
        """Adapters on the ``lora_targets`` outside the vision tower (a regular expression peft
        matches against full module names), and on its ``vision_lora_targets`` with ``train_vision``."""
        c = self.config
        prefix = re.escape(self.vision_prefix)
        pattern = rf"(?!{prefix}\.).*\.({'|'.join(map(re.escape, c.lora_targets))})"
        if c.train_vision:
            pattern += rf"|{prefix}\..*\.({'|'.join(map(re.escape, c.vision_lora_targets))})"
        return LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha if c.lora_alpha is not None else c.lora_rank,
                          target_modules=pattern, init_lora_weights=True, task_type="CAUSAL_LM")

    @classmethod
    def from_pretrained(cls, path_or_id: str, config: VLMPolicyConfig | None = None) -> VLMPolicy:
        """Load a Qwen2-VL model and processor (local dir or hub id, e.g.
        ``Qwen/Qwen2-VL-2B-Instruct``) or a saved genalign policy dir.

        ``trust_remote_code`` always comes from ``config`` (default False), never from a saved file.
        """
        config = copy.deepcopy(config) if config is not None else VLMPolicyConfig()
        meta_path = os.path.join(path_or_id, POLICY_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("type") != "vlm":
                raise ValueError(f"{meta_path} holds a {meta.get('type')!r} policy, not vlm")
            saved = VLMPolicyConfig(**meta["config"])
            trust = config.trust_remote_code
            if meta["finetune"] == "full":
                merged = merge_runtime(saved, config, path_or_id, base_keys=("train_vision",))
                merged.revision, merged.trust_remote_code = None, trust
                return cls(_load_model(merged), _load_processor(path_or_id, None, trust), merged)
            base = resolve_location(meta["base"], path_or_id)
            merged = merge_runtime(saved, config, base, base_keys=("revision", "train_vision", "vision_lora_targets"))
            merged.trust_remote_code = trust
            model = PeftModel.from_pretrained(_load_model(merged), path_or_id, is_trainable=True)
            return cls(model, _load_processor(path_or_id, None, trust), merged)
        config.pretrained = path_or_id
        config.validate()
        return cls(_load_model(config), _load_processor(path_or_id, config.revision, config.trust_remote_code), config)

    # -- the prompt side: chat text, image patches, positions --------------------------------
    def _encode_one(self, condition: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One condition's prompt ids, patches ``[P, D]`` and grids ``[I, 3]`` (empty without images)."""
        images = condition_images(condition)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": condition_text(condition)}]
        chat = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        enc = self.processor(text=[chat], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if not images:
            return ids, torch.zeros(0, self.patch_dim), torch.zeros(0, 3, dtype=torch.long)
        return ids, enc["pixel_values"].float(), enc["image_grid_thw"].long()

    def prompt_tokens(self, conditions: Sequence[Any]) -> list[list[int]]:
        """Each condition's prompt ids: the chat text with every image's placeholder tokens."""
        return self._encode_prompts(conditions)[0]

    def _encode_prompts(self, conditions: Sequence[Any]) -> tuple[list[list[int]], dict[str, Any]]:
        encoded: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}  # a condition's rows share one encoding
        rows = []
        for c in conditions:
            if id(c) not in encoded:
                encoded[id(c)] = self._encode_one(c)
            rows.append(encoded[id(c)])
        device = self.device
        return [list(r[0]) for r in rows], {
            "pixel_values": Ragged([r[1].to(device) for r in rows]),
            "image_grid_thw": Ragged([r[2].to(device) for r in rows]),
        }

    def _media(self, traj: Trajectory) -> dict[str, Any]:
        return {k: traj.extras[k] for k in MEDIA_KEYS}

    def _model_inputs(self, ids: torch.Tensor, mask: torch.Tensor, media: dict[str, Any]) -> dict[str, Any]:
        """``position_ids`` ``[3, N, L]`` (:func:`mrope_positions`) and, when a row has an image,
        the rows' patches and grids concatenated in row order (the order of their image tokens)."""
        n = ids.shape[0]
        grids = media["image_grid_thw"].values if media else [torch.zeros(0, 3, dtype=torch.long)] * n
        inputs: dict[str, Any] = {"position_ids": mrope_positions(ids, mask, grids, self.image_token_id, self.merge)}
        if any(len(g) for g in grids):
            inputs["pixel_values"] = torch.cat([v for v in media["pixel_values"].values]).to(ids.device)
            inputs["image_grid_thw"] = torch.cat([g for g in grids]).to(ids.device)
        return inputs

    def _row_keys(self, prompts: Sequence[Sequence[int]], media: dict[str, Any]) -> list[Sequence[Any]]:
        """A row's seed is mixed with its prompt ids and a digest of its image patches: the same
        question about two images draws different uniforms."""
        if not media:
            return [list(p) for p in prompts]
        keys = []
        for p, pixels in zip(prompts, media["pixel_values"].values):
            digest = hashlib.sha256(pixels.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            keys.append([*p, f"image:{digest}"])
        return keys

    # -- full-vocabulary scores ---------------------------------------------------------------
    @torch.no_grad()
    # -- saving -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """LoRA: a peft adapter folder; full: a transformers model folder. Both get the processor
        and the genalign policy file (a local base is recorded relative to ``directory``)."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)  # safetensors
        self.processor.save_pretrained(directory)
        base = portable_location(self.config.pretrained, directory) if self.config.finetune == "lora" else os.curdir
        meta = {"type": "vlm", "finetune": self.config.finetune, "base": base, "config": asdict(self.config)}
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def _vision_prefix(model: torch.nn.Module) -> str:
    """The qualified name of the vision tower (``model.visual`` in transformers 5, ``visual`` in 4.x)."""
    names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "visual"]
    if not names:
        raise ValueError(f"{type(model).__name__} has no vision tower module named 'visual' (not a Qwen2-VL model)")
    return names[0]


def _load_model(config: VLMPolicyConfig) -> Any:
    """The Qwen2-VL model at ``config.pretrained`` from safetensors weights; remote code only when configured."""
    from transformers import Qwen2VLForConditionalGeneration

    check_model_location(config.pretrained, "pretrained")
    kwargs: dict[str, Any] = {"trust_remote_code": True} if config.trust_remote_code else {}
    dtype = DTYPES[config.weight_dtype] if config.finetune == "lora" else torch.float32
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    return Qwen2VLForConditionalGeneration.from_pretrained(config.pretrained, revision=config.revision, use_safetensors=True, **kwargs)


def _load_processor(path_or_id: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    return AutoProcessor.from_pretrained(path_or_id, revision=revision, **kwargs)
