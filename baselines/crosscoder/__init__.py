"""Crosscoder baseline (Anthropic 2024; BatchTopK after Minder et al. 2025).

Not built yet: tracked by the crosscoder issue. It will train on the same ActivationStore that
``diffkit align`` reads (``diffkit.activations.ActivationStore.iter_batches``).
"""
