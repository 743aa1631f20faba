"""Small torch models of the toy experiments, trained on CPU in about a second each.

A network is an encoder ``x (N, 64) -> z (N, latent)`` with a head on top; the **latent** ``z`` is
what the experiments compare: the output of the encoder's last layer, after its ReLU.

- ``arch="mlp"``: ``depth`` hidden layers of width ``hidden`` (ReLU), then the latent layer.
- ``arch="cnn"``: the input as an 8×8 image, conv 3×3 → 16 channels, conv 3×3 stride 2 → 32
  channels (4×4), flattened, then the latent layer.

Objectives (heads on the latent):

- ``classify``:    linear head to 10 logits, cross-entropy.
- ``autoencode``:  decoder ``latent -> hidden -> 64`` (ReLU, then sigmoid), mean squared error.
- ``contrastive``: SimCLR-style InfoNCE (τ = 0.2) between two augmented views (Gaussian noise σ = 0.1,
  20% pixels dropped) through a linear projection head to 32 dims; no labels.

Training: Adam (lr 3e-3), batch 128, ``epochs`` passes, everything fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DiffkitError
from .data import D_IN, training_set

ARCHS = ("mlp", "cnn")
OBJECTIVES = ("classify", "autoencode", "contrastive")


@dataclass(frozen=True)
class NetSpec:
    """Everything that determines a trained network, except its seed."""

    data: str = "digits"
    arch: str = "mlp"
    depth: int = 1
    hidden: int = 128
    latent: int = 32
    objective: str = "classify"
    epochs: int = 30
    trained: bool = True  # False: the network at initialisation (a floor for the measures)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise DiffkitError(f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.objective not in OBJECTIVES:
            raise DiffkitError(f"unknown objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.depth < 1 or self.hidden < 1 or self.latent < 1 or self.epochs < 0:
            raise DiffkitError(f"network sizes must be positive: {self}")

    def label(self) -> str:
        body = "cnn" if self.arch == "cnn" else f"mlp{self.depth}x{self.hidden}"
        return f"{body}-z{self.latent}-{self.objective}-{self.data}" + ("" if self.trained else "-untrained")


def build(spec: NetSpec) -> Any:
    """An untrained network of ``spec`` (torch.nn.Module with ``encode`` and ``layers``)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if spec.arch == "mlp":
                dims = [D_IN] + [spec.hidden] * spec.depth
                self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
                feat = dims[-1]
            else:
                self.body = nn.ModuleList([nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)])
                feat = 32 * 4 * 4
            self.latent = nn.Linear(feat, spec.latent)
            if spec.objective == "classify":
                self.head = nn.Linear(spec.latent, 10)
            elif spec.objective == "autoencode":
                self.head = nn.Sequential(nn.Linear(spec.latent, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, D_IN),
                                          nn.Sigmoid())
            else:
                self.head = nn.Linear(spec.latent, 32)

        def layers(self, x: Any) -> list:
            """Activations after each ReLU: the hidden layers, then the latent (last)."""
            h = x.view(-1, 1, 8, 8) if spec.arch == "cnn" else x
            out = []
            for layer in self.body:
                h = torch.relu(layer(h))
                out.append(h.flatten(1))
            out.append(torch.relu(self.latent(h.flatten(1))))
            return out

        def encode(self, x: Any) -> Any:
            return self.layers(x)[-1]

        def forward(self, x: Any) -> Any:
            return self.head(self.encode(x))

    return Net()


def _loss(net: Any, spec: NetSpec, x: Any, y: Any, gen: Any) -> Any:
    import torch
    import torch.nn.functional as F

    if spec.objective == "classify":
        return F.cross_entropy(net(x), y)
    if spec.objective == "autoencode":
        return F.mse_loss(net(x), x)

    def view(x: Any) -> Any:
        keep = (torch.rand(x.shape, generator=gen) > 0.2).float()
        return (x + 0.1 * torch.randn(x.shape, generator=gen)) * keep

    p1, p2 = F.normalize(net(view(x)), dim=1), F.normalize(net(view(x)), dim=1)
    logits = torch.cat([p1, p2]) @ torch.cat([p1, p2]).T / 0.2
    logits.fill_diagonal_(-1e9)
    n = len(x)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def train(spec: NetSpec, seed: int) -> Any:
    """Train a network of ``spec`` from ``seed`` on ``spec.data``; returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    net = build(spec)
    if not spec.trained or spec.epochs == 0:
        return net.eval()
    data = training_set(spec.data, seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = _loss(net, spec, x[idx], y[idx], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def latents(net: Any, x: np.ndarray, layer: int = -1) -> np.ndarray:
    """Activations of ``layer`` (-1: the latent) on inputs ``x`` as float64 (N, width)."""
    import torch

    with torch.no_grad():
        return net.layers(torch.as_tensor(x, dtype=torch.float32))[layer].double().numpy()


def accuracy(net: Any, spec: NetSpec, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a classifier (NaN for other objectives)."""
    import torch

    if spec.objective != "classify":
        return float("nan")
    with torch.no_grad():
        return float((net(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


def permuted_copy(net: Any, spec: NetSpec, perm: np.ndarray) -> Any:
    """A copy of ``net`` whose latent unit ``j`` is ``net``'s unit ``perm[j]``, same function.

    The latent layer's rows are permuted and the head's input columns with them, so the outputs are
    unchanged and ``latents(copy)[:, j] == latents(net)[:, perm[j]]`` exactly: the planted case.
    """
    import copy

    import torch

    perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    out = copy.deepcopy(net)
    with torch.no_grad():
        out.latent.weight.copy_(net.latent.weight[perm])
        out.latent.bias.copy_(net.latent.bias[perm])
        first = out.head if isinstance(out.head, torch.nn.Linear) else out.head[0]
        src = net.head if isinstance(net.head, torch.nn.Linear) else net.head[0]
        first.weight.copy_(src.weight[:, perm])
    return out
