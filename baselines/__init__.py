"""Baselines that diffkit's training-free diff is compared against (the crosscoder)."""
