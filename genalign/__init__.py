"""genalign: align generative models with rewards through one trajectory interface.

    from genalign import train
    history = train("configs/quickstart.yaml", overrides=["train.epochs=3"], resume=False)

``import genalign`` stays light: ``train`` (and torch, diffusers) load on first use.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from genalign.trainer import train

        return train
    raise AttributeError(f"module 'genalign' has no attribute {name!r}")
