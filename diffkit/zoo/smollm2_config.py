"""Sizes of ``diffkit zoo build smollm2`` (pure data: no torch import).

``cpu`` fits ~25 minutes on a 2-core machine; ``gpu`` is a realistic budget for one GPU (>= 10M
tokens collected and used, 16,384-feature SAEs, a 16,384-latent crosscoder). The config a run used
is saved as ``config.json`` in its work directory and a resumed run must use the same one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..errors import DiffkitError

HOOK = "blocks.15.hook_resid_post"  # the middle of SmolLM2-135M's 30 layers


@dataclass(frozen=True)
class Smollm2Config:
    """Every option of the recipe; ``size`` names the preset it started from."""

    size: str = "cpu"
    hook: str = HOOK
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    # (a) fine-tune a copy of SmolLM2 on Python source (stdlib .py files, train split)
    ft_steps: int = 60
    ft_batch: int = 8
    ft_ctx: int = 64
    ft_lr: float = 2e-4
    ft_warmup: int = 5
    eval_seqs: int = 24             # held-out sequences per domain (ctx eval_ctx) for the loss table
    eval_ctx: int = 128
    # (b) paired activations of both models on mixed prose + code
    tokens: int = 150_000
    ctx: int = 128
    collect_batch: int = 16
    store_dtype: str = "float32"
    # SmolLM2 puts "massive activations" on a few tokens at layer 15 (0.02% of tokens at ~150x the
    # median norm, 65% of the variance): the first cpu run's map reached FVE 0.67 with them in,
    # 0.87 when the top 0.5% norms were left out. Tokens above 10x their sequence's median are dropped.
    max_norm_ratio: float = 10.0
    # (c) one TopK SAE per model (sae-lens SAETrainer)
    sae_d: int = 4096
    sae_k: int = 32
    sae_steps: int = 300
    sae_batch: int = 1024
    sae_lr: float = 2e-3
    # "mean": b_dec starts at the mean activation (as sae-lens's runner's b_dec_init_method="mean"):
    # SmolLM2's residual has a large mean, and from b_dec = 0 the first run left ~60% of latents dead.
    sae_b_dec_init: str = "mean"
    # (d) BatchTopK crosscoder, then compare and report
    cc_dict: int = 4096
    cc_k: int = 32
    cc_tokens: int = 300_000
    cc_batch: int = 2048
    cc_lr: float = 1e-3
    compare_tokens: int = 50_000

    def __post_init__(self) -> None:
        positive = ("threads", "ft_batch", "eval_seqs", "tokens", "collect_batch", "sae_d", "sae_k",
                    "sae_steps", "sae_batch", "cc_dict", "cc_k", "cc_tokens", "cc_batch", "compare_tokens")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if bad:
            raise DiffkitError(f"smollm2 recipe: {', '.join(bad)} must be positive")
        if self.ft_steps < 0 or self.ft_ctx < 2 or self.ctx < 2 or self.eval_ctx < 2:
            raise DiffkitError("smollm2 recipe: ft_steps must be >= 0 and every context length >= 2")
        if self.sae_k > self.sae_d or self.cc_k > self.cc_dict:
            raise DiffkitError(f"smollm2 recipe: k must not exceed the dictionary size (SAE {self.sae_k} > "
                               f"{self.sae_d} or crosscoder {self.cc_k} > {self.cc_dict})")

        if self.sae_b_dec_init not in ("mean", "zeros"):
            raise DiffkitError(f"smollm2 recipe: sae_b_dec_init {self.sae_b_dec_init!r} must be 'mean' or 'zeros'")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Smollm2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DiffkitError(f"smollm2 config has unknown keys {unknown}: it was written by another diffkit version; "
                               "use a new --work directory")
        return cls(**data)


SIZES: dict[str, Smollm2Config] = {
    # Measured on 2 cores: see reports/smollm2/report.md for the wall time of each stage.
    "cpu": Smollm2Config(),
    # One GPU: 1,000 fine-tune steps of 32 x 256 tokens (8.2M tokens of code), 12M paired tokens
    # (float16 store, 2 x 13 GiB), SAEs of 16,384 latents on 8 x 1.5M = 12M samples each, and a
    # 16,384-latent crosscoder on 24M tokens (two epochs of the store).
    "gpu": Smollm2Config(size="gpu", device="cuda", threads=8, ft_steps=1000, ft_batch=32, ft_ctx=256, ft_lr=1e-4,
                         ft_warmup=50, eval_seqs=256, tokens=12_000_000, ctx=256, collect_batch=64,
                         store_dtype="float16", sae_d=16_384, sae_k=64, sae_steps=3000, sae_batch=4096,
                         sae_lr=5e-4, cc_dict=16_384, cc_k=64, cc_tokens=24_000_000, cc_batch=4096, cc_lr=5e-4,
                         compare_tokens=500_000),
}


def size_config(size: str, **overrides) -> Smollm2Config:
    """The preset ``size`` with ``overrides`` (e.g. ``device``, ``threads``) applied."""
    if size not in SIZES:
        raise DiffkitError(f"unknown smollm2 size {size!r}: use one of {', '.join(SIZES)}")
    return replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


# The stage that first reads each option (options absent here, such as threads or device, change how a
# stage runs, not what it makes) and the stages each stage reads from: a resume with changed options
# reruns the stages they reach and keeps the rest.
FIELD_STAGE = {"seed": "finetune", "ft_steps": "finetune", "ft_batch": "finetune", "ft_ctx": "finetune",
               "ft_lr": "finetune", "ft_warmup": "finetune", "eval_seqs": "losses", "eval_ctx": "losses",
               "hook": "collect", "tokens": "collect", "ctx": "collect", "collect_batch": "collect",
               "store_dtype": "collect", "max_norm_ratio": "collect", "sae_d": "saes", "sae_k": "saes",
               "sae_steps": "saes", "sae_batch": "saes",
               "sae_lr": "saes", "sae_b_dec_init": "saes", "cc_dict": "crosscoder", "cc_k": "crosscoder",
               "cc_tokens": "crosscoder", "cc_batch": "crosscoder", "cc_lr": "crosscoder", "compare_tokens": "compare"}
STAGE_INPUTS = {"finetune": (), "losses": ("finetune",), "collect": ("finetune",), "saes": ("collect",),
                "align": ("saes",), "crosscoder": ("collect",), "compare": ("align", "crosscoder")}


def stale_stages(old: Smollm2Config, new: Smollm2Config, unrecorded: tuple[str, ...] = ()) -> list[str]:
    """The stages a resume must rerun when the config changes from ``old`` to ``new`` (in stage order).

    ``unrecorded``: options the old run's config.json lacks (written before they existed): their
    stages ran without them, so they count as changed.
    """
    stale = {FIELD_STAGE[f.name] for f in fields(Smollm2Config) if f.name in FIELD_STAGE and
             (getattr(old, f.name) != getattr(new, f.name) or f.name in unrecorded)}
    for stage, inputs in STAGE_INPUTS.items():  # STAGE_INPUTS is in stage order: one pass propagates
        if any(i in stale for i in inputs):
            stale.add(stage)
    return [s for s in STAGE_INPUTS if s in stale]
