"""Train the zoo from its recipes: tiny TransformerLens models, then an sae-lens SAE for each.

Everything is seeded; run on CPU with a fixed thread count the result is reproducible on one
machine (floating-point reductions may differ across CPUs, so the committed files are the
reference, not a hash to match elsewhere).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..corpora import token_sequences
from ..tokenizer import ByteTokenizer
from .recipes import (BLOCK0_MODELS, LAST_SAE_MODELS, LAST_SAE_RECIPE, ORGANISM_MODELS, RECIPES, SAE_RECIPE, ModelRecipe, SAERecipe,
                      sae_plan)

EVAL_SEQUENCES = 64  # held-out sequences per domain for `zoo info`


def sequence_matrix(corpus: str, split: str, ctx: int, limit: int | None = None, seed: int = 0):
    """(ids, lengths) arrays of a corpus split, in the deterministic stream order."""
    tok = ByteTokenizer()
    ids, lengths = [], []
    for seq in token_sequences(corpus, tok, ctx, split=split, seed=seed):
        ids.append(seq.ids)
        lengths.append(seq.length)
        if limit is not None and len(ids) >= limit:
            break
    return np.stack(ids).astype(np.int64), np.asarray(lengths, dtype=np.int64)


def next_token_loss(model: Any, ids: Any, lengths: Any) -> Any:
    """Mean cross-entropy (nats/token) of next-token prediction over real (non-pad) targets."""
    import torch
    import torch.nn.functional as F

    logits = model(ids, return_type="logits")[:, :-1]
    targets = ids[:, 1:]
    mask = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :] < (lengths[:, None] - 1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum()


def heldout_losses(model: Any, ctx: int = 128) -> dict[str, float]:
    """Held-out loss on prose and on code (the corpora's held-out documents)."""
    import torch

    out = {}
    for domain in ("prose", "code"):
        ids, lengths = sequence_matrix(domain, "heldout", ctx, limit=EVAL_SEQUENCES)
        with torch.no_grad():
            out[domain] = float(next_token_loss(model, torch.from_numpy(ids), torch.from_numpy(lengths)))
    return out


def warmup_cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to a tenth of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_at(step: int, recipe: ModelRecipe) -> float:
    return warmup_cosine_lr(step, recipe.lr, recipe.warmup_steps, recipe.steps)


def train_model(recipe: ModelRecipe, init_state: dict | None = None, progress: Callable | None = None) -> Any:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(recipe.seed)
    cfg = HookedTransformerConfig(n_layers=recipe.n_layers, d_model=recipe.d_model, n_heads=recipe.n_heads,
                                  d_head=recipe.d_model // recipe.n_heads, d_mlp=recipe.d_mlp,
                                  n_ctx=recipe.n_ctx, d_vocab=ByteTokenizer.vocab_size, act_fn="gelu",
                                  normalization_type="LN", seed=recipe.seed)
    model = HookedTransformer(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    ids, lengths = sequence_matrix(recipe.corpus, "train", recipe.n_ctx, seed=recipe.seed)
    ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        batch = torch.randint(0, len(ids), (recipe.batch_size,), generator=gen)
        loss = next_token_loss(model, ids_t[batch], lengths_t[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval()
    return model


def train_sae(model: Any, recipe: SAERecipe, model_name: str, out_dir: Path) -> dict:
    """A zoo SAE: :func:`diffkit.sae_train.train_sae` (the one SAE trainer, sae-lens's own) on raw activations
    of ``recipe.corpus``, batches drawn with replacement by the recipe's seeded sampler, saved in sae-lens
    format; FVU, L0 and dead fraction on held-out prose and code. Gives the weights the zoo's earlier
    direct ``SAETrainer.fit`` call gave, bit for bit (tests/test_sae_train.py pins it)."""
    import torch

    from ..sae_train import SAETrainConfig, train_sae as train

    ids, lengths = sequence_matrix(recipe.corpus, "train", model.cfg.n_ctx, seed=recipe.seed,
                                   limit=math.ceil(recipe.tokens / (model.cfg.n_ctx - 1)))
    acts = token_activations(model, recipe.hook, ids, lengths)
    gen = torch.Generator().manual_seed(recipe.seed)
    batches = (acts[torch.randint(0, len(acts), (recipe.batch_size,), generator=gen)] for _ in iter(int, 1))
    cfg = SAETrainConfig(arch="topk", d_sae=recipe.d_sae, k=recipe.k, tokens=recipe.steps * recipe.batch_size,
                         batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, normalize=False,
                         checkpoint_every=recipe.steps)  # a zoo SAE takes seconds: no checkpoints
    with torch.no_grad():
        held = torch.cat([_heldout_acts(model, recipe.hook, domain) for domain in ("prose", "code")])
    rec = train(batches, int(model.cfg.d_model), cfg, out_dir, recipe.hook, heldout=lambda: [held],
                metadata={"model_name": f"zoo:{model_name}", "context_size": int(model.cfg.n_ctx)},
                inputs={"corpus": recipe.corpus, "sampler": "uniform with replacement, torch.Generator(seed)"},
                overwrite=True, progress=False)
    return {"fvu": 1.0 - rec["fve"], "l0": rec["l0"], "dead_fraction": rec["dead_fraction"],
            "train_tokens": int(len(acts)), "eval_tokens": rec["eval_tokens"],
            "fvu_formula": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2"}


def token_activations(model: Any, hook: str, ids: np.ndarray, lengths: np.ndarray, batch: int = 64) -> Any:
    """(n_tokens, d) activations at ``hook`` over the real tokens of ``ids``: BOS and padding dropped."""
    import torch

    from ..forward import hook_activations

    chunks = []
    for start in range(0, len(ids), batch):
        act = hook_activations(model, torch.from_numpy(ids[start:start + batch]), hook)
        mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths[start:start + batch])[:, None]
        mask[:, 0] = False
        chunks.append(act[mask])
    return torch.cat(chunks)


def _heldout_acts(model: Any, hook: str, domain: str, n_seqs: int = EVAL_SEQUENCES) -> Any:
    ids, lengths = sequence_matrix(domain, "heldout", model.cfg.n_ctx, limit=n_seqs)
    return token_activations(model, hook, ids, lengths)


def behaviour_figures(name: str, model: Any, base: Any) -> dict | None:
    """Held-out behaviour of organism ``name`` and of base on the same test (None: no planted behaviour)."""
    from .behaviour import BEHAVIOUR

    fn = BEHAVIOUR.get(name)
    return None if fn is None else {"organism": fn(model), "base": fn(base)}


def sae_key(recipe: SAERecipe, seed: int) -> str:
    """build.json key of an SAE: ``sae``, ``sae_seed1`` (blocks.0), ``sae_blocks.1``, ``sae_blocks.1_seed1``."""
    stem = "sae" if recipe.hook == SAE_RECIPE.hook else f"sae_{recipe.hook.removesuffix('.hook_resid_post')}"
    return stem if seed == 0 else f"{stem}_seed{seed}"


def build_zoo(names: list[str] | None = None, out_root: Path | None = None, saes_only: bool = False,
              hooks: list[str] | None = None, log: Callable = print) -> dict:
    """Train the named zoo models (all by default) and their SAEs; write artifacts and build.json.

    ``saes_only`` keeps the existing models and retrains only their SAEs; ``hooks`` trains only the
    SAEs at those hooks (the others, and their build.json entries, are kept).
    """
    import torch
    from ..progress import tqdm

    from . import ARTIFACTS, sae_subdir
    from ..models import load_checkpoint, save_checkpoint
    from ..tokenizer import ByteTokenizer as Tok

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_root = Path(out_root or ARTIFACTS)
    names = names or list(RECIPES)
    build_file = out_root / "build.json"
    report: dict[str, Any] = json.loads(build_file.read_text()) if build_file.exists() else {}
    for name in names:
        recipe = RECIPES[name]
        model_dir = out_root / name / "model"
        t0 = time.time()
        old = report.get(name, {})
        entry = dict(old) if saes_only else {}  # a retrained model: its old SAEs no longer describe it
        if not saes_only:
            init = None
            if recipe.init_from:
                init_dir = out_root / recipe.init_from / "model"
                if not init_dir.exists():
                    raise FileNotFoundError(f"{name} fine-tunes {recipe.init_from}: build it first")
                init = load_checkpoint(init_dir)[0].state_dict()
            bar = tqdm(total=recipe.steps, desc=f"zoo:{name}", unit="step")

            def progress(step, loss, bar=bar):
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

            model = train_model(recipe, init, progress)
            bar.close()
            losses = heldout_losses(model, recipe.n_ctx)
            save_checkpoint(model, Tok(), model_dir, dtype="float16",
                            provenance={"recipe": asdict(recipe), "heldout_loss": losses})
            entry.update({"recipe": asdict(recipe), "heldout_loss": losses,
                          "model_seconds": round(time.time() - t0, 1)})
        model = load_checkpoint(model_dir)[0]  # the SAE sees the weights as saved
        if "heldout_loss" not in entry:  # --saes-only on models that build.json does not describe
            entry["heldout_loss"] = heldout_losses(model, recipe.n_ctx)
        if not saes_only and recipe.init_from:
            figures = behaviour_figures(name, model, load_checkpoint(out_root / recipe.init_from / "model")[0])
            if figures is not None:
                entry["behaviour"] = figures
        for sae_recipe, seed in sae_plan(name):
            sae_recipe = SAE_RECIPE if sae_recipe.hook == SAE_RECIPE.hook else LAST_SAE_RECIPE  # (module names: tests shrink them)
            if hooks is not None and sae_recipe.hook not in hooks:
                continue
            t1 = time.time()
            key = sae_key(sae_recipe, seed)
            entry[key] = train_sae(model, replace(sae_recipe, seed=seed), name,
                                   out_root / name / sae_subdir(seed, sae_recipe.hook))
            entry[key]["seconds"] = round(time.time() - t1, 1)
        report[name] = entry
        losses = entry["heldout_loss"]
        saes = "; ".join(f"{k} FVU {v['fvu']:.3f} dead {v['dead_fraction']:.1%}" for k, v in entry.items()
                         if k.startswith("sae") and isinstance(v, dict))
        behaviour = f"; behaviour {json.dumps(entry['behaviour'])}" if "behaviour" in entry else ""
        log(f"zoo:{name}: held-out loss prose {losses['prose']:.3f}, code {losses['code']:.3f}; {saes}{behaviour} "
            f"({time.time() - t0:.0f} s)")
        report["_sae_recipe"] = asdict(SAE_RECIPE)
        report["_last_sae_recipe"] = asdict(LAST_SAE_RECIPE)
        build_file.parent.mkdir(parents=True, exist_ok=True)
        build_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")  # after each model: resumable
    return report


def build_organisms(out_root: Path | None = None, log: Callable = print) -> dict:
    """The organisms and every last-block SAE: train the organism models (from the built base), then the
    ``LAST_HOOK`` SAEs of the original zoo models; their models and blocks.0 SAEs stay as they are."""
    t0 = time.time()
    build_zoo(list(ORGANISM_MODELS), out_root, log=log)
    report = build_zoo([n for n in BLOCK0_MODELS if n in LAST_SAE_MODELS], out_root, saes_only=True,
                       hooks=[LAST_SAE_RECIPE.hook], log=log)
    report["_organisms_seconds"] = round(time.time() - t0, 1)
    from . import ARTIFACTS

    build_file = Path(out_root or ARTIFACTS) / "build.json"
    build_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log(f"organisms and last-block SAEs built in {time.time() - t0:.0f} s")
    return report
