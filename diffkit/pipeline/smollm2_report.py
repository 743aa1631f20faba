"""``report.style = "smollm2"``: the preamble of the smollm2 recipe (``configs/smollm2-cpu.toml``).

What a researcher checks before reading any diff of a real model and its fine-tune: did the
fine-tune move the model toward its corpus (held-out loss per domain), how well each SAE
reconstructs (held-out FVE), and what the top-ranked *changed* shared features (align's default
``act-mass`` ranking) fire on in each model.
"""

from __future__ import annotations

import platform

import numpy as np

from .config import PipelineConfig
from .stages import Context, run_dir

TOP_CHANGED = 8
MIN_FREQ = 1e-3  # both features of a listed changed pair fire on >= 0.1% of the store's tokens


def _top_rows(store, side: str, sae, feature: int, tokens: int, n: int = 3) -> np.ndarray:
    """Held-out row indices of the ``n`` largest activations of ``feature`` (first ``tokens`` tokens)."""
    import torch

    col = 0 if side == "a" else 1
    best_v, best_i, seen = [], [], 0
    with torch.no_grad():
        for ab in store.iter_shards("heldout", normalized=False):
            x = ab[col].float()[: max(tokens - seen, 0)]
            if len(x) == 0:
                break
            f = sae.encode(x)[:, feature]
            v, i = torch.topk(f, min(n, len(f)))
            best_v.append(v)
            best_i.append(i + seen)
            seen += len(x)
    v, i = torch.cat(best_v), torch.cat(best_i)
    keep = torch.argsort(v, descending=True)[:n]
    return np.asarray([int(i[k]) if float(v[k]) > 0 else -1 for k in keep], dtype=np.int64)


def changed_features(ctx: Context, n: int = TOP_CHANGED, min_freq: float = MIN_FREQ) -> list[dict]:
    """The ``n`` top-ranked shared pairs of the diff whose features both fire on at least ``min_freq`` of the
    tokens, with where each side's feature fires (held-out contexts).

    Why the floor: ``act_mass_log_ratio`` of a pair in which one feature (almost) never fires is a
    ratio of two tiny numbers; on a small budget, with many rare latents, such pairs take every top rank.
    """
    from ..activations import ActivationStore
    from ..diff import decode_contexts, load_table, store_tokenizer
    from ..saes import load_sae

    table = load_table(run_dir(ctx.work, "align", "diff"))
    shared = table[table.kind == "shared"].sort_values("rank")
    shared = shared[(shared.freq_a >= min_freq) & (shared.freq_b >= min_freq)].head(n)
    store = ActivationStore.open(ctx.work / "store-diff")
    tok = store_tokenizer(store)
    saes = {s: load_sae(ctx.results["saes"][s]["spec"]).sae for s in ("a", "b")}
    rows = []
    for r in shared.itertuples():
        texts = {s: decode_contexts(store, _top_rows(store, s, saes[s], int(getattr(r, f"feature_{s}")),
                                                     ctx.cfg.compare.tokens), "heldout", tok) for s in ("a", "b")}
        rows.append({"rank": int(r.rank), "feature A": int(r.feature_a), "feature B": int(r.feature_b),
                     "cosine": float(r.cosine), "act-mass log ratio (A/B)": float(r.act_mass_log_ratio),
                     "freq A": float(r.freq_a), "freq B": float(r.freq_b),
                     "contexts A": " · ".join(texts["a"][:2]), "contexts B": " · ".join(texts["b"][:2])})
    return rows


def _massive_note(cfg: PipelineConfig, results: dict) -> str:
    """Why some tokens are missing: SmolLM2's massive activations (see CollectConfig.max_norm_ratio)."""
    if not cfg.data.max_norm_ratio:
        return ""
    dropped = results["collect"]["stores"][0].get("massive_dropped")
    count = f"{dropped:,} tokens" if dropped is not None else "tokens"
    return (f", and {count} whose norm exceeds {cfg.data.max_norm_ratio:g}× their sequence's median: SmolLM2's "
            "massive activations, ~150× the median on 0.02% of tokens, held 65% of the variance and capped the "
            "map's FVE at 0.67 in a run that kept them")


def smollm2_preamble(ctx: Context, tables) -> list[str]:
    import pandas as pd

    from ..diff import load_table
    from ..report.markdown import md_context

    cfg, results = ctx.cfg, ctx.results
    f, d, t, c = cfg.finetune, cfg.data, cfg.saes.train, cfg.crosscoder
    pre = ["## This run", "", f"Command: `{ctx.command}` ({platform.machine()}, {cfg.threads} torch threads, device "
           f"{cfg.device}); wall time per stage at the end.", ""]
    budget = (f"Budget: fine-tune {f.steps} steps × {f.batch} × {f.ctx} tokens of `{f.corpus}` (lr {f.lr:g}); "
              f"{d.tokens:,} paired tokens at `{d.hook}` (ctx {d.ctx}, corpus `{d.corpus}`, BOS and padding "
              f"excluded{_massive_note(cfg, results)}); TopK SAEs of {t.d_sae:,} latents (k {t.k}, {t.tokens // t.batch_size} × "
              f"{t.batch_size} samples); BatchTopK crosscoder of {c.dict_size:,} latents (k {c.k}, {c.tokens:,} tokens).")
    pre += [budget + (" " + cfg.report.intro.strip() if cfg.report.intro else ""), ""]
    losses = results["losses"]
    base, tuned = losses["rows"][0], losses["rows"][1]
    pre += ["## The two models", "", f"Base: `{cfg.models.a}`. Fine-tuned: a copy trained on `{f.corpus}` (train "
            f"split). Held-out next-token loss (nats/token, {losses['sequences']} sequences of ctx {losses['ctx']} per "
            "domain, documents never trained on): the fine-tune should be better on code.", ""]
    loss_df = pd.DataFrame([{"model": m, "prose": r["prose"], "code": r["code"]}
                            for r, m in ((base, cfg.models.a), (tuned, "fine-tuned on code"))])
    pre += tables.add("losses", loss_df)
    d_code, d_prose = tuned["code"] - base["code"], tuned["prose"] - base["prose"]
    pre += [f"The fine-tune changes held-out loss by {d_code:+.3f} nats/token on code and {d_prose:+.3f} on prose "
            "(the prose corpus, Python's own pydoc topics, is documentation about Python and holds code examples, so "
            "a code fine-tune may help it too).", ""]
    ft = results.get("finetune", {}).get("train_loss")
    if ft:
        pre += [f"Fine-tune training loss: first step {ft[0]:.3f}, mean of the last 10 steps "
                f"{float(np.mean(ft[-10:])):.3f}.", ""]
    saes = results["saes"]
    sae_df = pd.DataFrame([{"SAE": f"model {s.upper()}", "latents": t.d_sae, "k": t.k,
                            "held-out FVE": saes[s].get("fve"), "L0": saes[s].get("l0"),
                            "dead": saes[s].get("dead_fraction")} for s in ("a", "b")])
    pre += ["## SAEs", "", "sae-lens TopK SAEs trained with `SAETrainer` on each model's raw activations (the store's "
            "train split). FVE = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² on the held-out split; dead = never fired there.", ""]
    pre += tables.add("saes", sae_df)
    changed = changed_features(ctx)
    shared = load_table(run_dir(ctx.work, "align", "diff")).query("kind == 'shared'").sort_values("rank")
    rare = int(((shared.freq_a < MIN_FREQ) | (shared.freq_b < MIN_FREQ)).head(50).sum())
    pre += ["## Top-ranked changed features", "", "Shared pairs ranked by align's default score, the centred "
            "activation-mass log ratio (positive: stronger in the base model A), keeping pairs whose two features "
            f"both fire on ≥ {MIN_FREQ:.1%} of the store's tokens: {rare} of the 50 top-ranked pairs fail that, a "
            "rare feature on one side making the ratio of two tiny masses extreme. Contexts are each feature's top "
            "activations on held-out tokens of its own model (the token in bold).", ""]
    cells = {c: [" · ".join(md_context(x) for x in r[c].split(" · ")) if r[c] else "(never fired)" for r in changed]
             for c in ("contexts A", "contexts B")}
    pre += tables.add("changed_features", pd.DataFrame(changed), cells=cells)
    return pre
