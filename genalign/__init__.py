"""genalign: align generative models with rewards through one trajectory interface."""

__version__ = "0.1.0"
