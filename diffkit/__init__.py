"""diffkit: which learned features do two neural networks share, and which does only one have?

Importing the package is cheap on purpose: torch, TransformerLens and sae-lens are imported by the
modules that need them, so ``diffkit --help`` answers in well under a second.
"""

__version__ = "0.1.0"
