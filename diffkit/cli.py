"""The ``diffkit`` command line: parse options, call the library, print a summary.

Heavy libraries (torch, TransformerLens, sae-lens) are imported inside the commands, so
``diffkit --help`` stays fast. A :class:`~diffkit.errors.DiffkitError` becomes a one-line
``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .devices import resolve_device as _device
from .errors import DiffkitError


class _Group(click.Group):
    """Turns DiffkitError into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DiffkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)




def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffkit")
def main() -> None:
    """diffkit: which learned features do two models share, and which does only one have?

    \b
    Start here:
      diffkit zoo list                      the embedded tiny models (no download needed)
      diffkit collect --model-a zoo:base --model-b zoo:finetuned \\
          --hook blocks.0.hook_resid_post --corpus mixed --tokens 100000 --out runs/store
      diffkit store info runs/store         what a store holds
      diffkit demo                          the end-to-end run on the zoo
    """


@main.command()
@click.option("--model-a", required=True, help="Model A: zoo:NAME, a model directory, or a TransformerLens name.")
@click.option("--model-b", required=True, help="Model B (same tokenizer as A).")
@click.option("--hook", required=True, help="Hook of model A, e.g. blocks.0.hook_resid_post.")
@click.option("--hook-b", default=None, help="Hook of model B when it differs from --hook.")
@click.option("--corpus", default="mixed", show_default=True,
              help="prose | code | mixed (shipped with Python), a text file, a directory, a .npy of token ids, a .jsonl "
              "or a quoted glob ('data/*.jsonl', SOURCE#FIELD names the text field), or hf:NAME[:CONFIG][@SPLIT] "
              "(a Hugging Face dataset, a local data folder or a save_to_disk folder).")
@click.option("--corpus-split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True,
              help="Which documents of a corpus to use (the corpus's own document-level split).")
@click.option("--tokens", type=int, required=True, help="Number of token positions to store (BOS/padding excluded).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory of the store.")
@click.option("--ctx", type=int, default=128, show_default=True, help="Sequence length, BOS included.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the document and sequence order.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Sequences per forward pass.")
@click.option("--shard-mb", type=float, default=32.0, show_default=True, help="Target shard size for the wider model.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype of activations.")
@click.option("--heldout-every", type=int, default=10, show_default=True,
              help="Every N-th sequence goes to the held-out split (0: none).")
@click.option("--max-norm-ratio", type=float, default=0.0, show_default=True,
              help="Leave out tokens whose activation norm (either model) exceeds this multiple of their "
              "sequence's median norm: the 'massive activations' of some LMs (try 10). 0 keeps every token.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an interrupted collection in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def collect(model_a, model_b, hook, hook_b, corpus, corpus_split, tokens, out, ctx, seed, batch_size, shard_mb,
            dtype, heldout_every, max_norm_ratio, device, resume, overwrite, quiet):
    """Run two models on the same tokens and store their activations (an ActivationStore).

    Each model runs only up to the layer of its hook. BOS and padding positions are not stored.
    Every --heldout-every-th sequence is held out for scoring fitted maps. An interrupted run is
    finished with the same command plus --resume and gives exactly the uninterrupted store.
    """
    from .activations import CollectConfig, collect_activations

    cfg = CollectConfig(model_a=model_a, model_b=model_b, hook_a=hook, hook_b=hook_b or hook, corpus=corpus,
                        tokens=tokens, corpus_split=corpus_split, ctx=ctx, seed=seed, batch_size=batch_size,
                        shard_mb=shard_mb, dtype=dtype, heldout_every=heldout_every, max_norm_ratio=max_norm_ratio)
    summary = collect_activations(cfg, out, resume=resume, overwrite=overwrite, device=_device(device),
                                  progress=not quiet, log=click.echo)
    click.echo(f"stored {summary.tokens:,} tokens (train {summary.train_tokens:,}, held-out "
               f"{summary.heldout_tokens:,}) in {summary.shards} shards, {_human_bytes(summary.bytes)}, at {out}")
    click.echo(f"normalization scale  A: {summary.scale_a:.4g}  B: {summary.scale_b:.4g}  (sqrt(d)/mean norm)")
    if max_norm_ratio:
        click.echo(f"left out {summary.massive_dropped:,} tokens above {max_norm_ratio:g}x their sequence's median norm")
    if summary.heldout_tokens == 0:
        click.echo(f"note: no held-out tokens (every {heldout_every}th sequence is held out, and this store has fewer): "
                   "fitted maps cannot be scored on it; collect more --tokens or lower --heldout-every")
    resumed = f", {summary.resumed_shards} shards kept from the interrupted run" if summary.resumed_shards else ""
    click.echo(f"{summary.seconds:.1f} s, {summary.tokens_per_second:,.0f} tokens/s{resumed}")


@main.group()
def store() -> None:
    """Inspect, check and import activation stores."""


@store.command("info")
@click.argument("path", type=click.Path(path_type=Path))
def store_info(path):
    """Print what a store holds: models, hooks, tokens, shards, scales, labels."""
    import numpy as np

    from .activations import ActivationStore

    st = ActivationStore.open(path)
    m = st.manifest
    click.echo(repr(st))
    for src in ("a", "b"):
        s = m["sources"][src]  # spec / source are descriptive: a store written by other tools may lack them
        click.echo(f"  {src.upper()}: {s.get('spec', '?')} ({s.get('source', '?')}) hook {st.hook(src)} d_model {st.d_model(src)} "
                   f"scale {st.scale(src):.4g}")
    size = sum(f["bytes"] for sh in m["shards"] for f in sh["files"].values())
    cfg = m["config"]
    click.echo(f"  corpus {cfg['corpus']} (split {cfg['corpus_split']}), ctx {cfg['ctx']}, seed {cfg['seed']}, "
               f"{st.n_shards} shards, {_human_bytes(size)}, dtype {cfg['dtype']}")
    if st.has_labels:  # the answer key of a planted corpus: rows per label over the whole store
        counts = np.bincount(st.labels("all"), minlength=len(st.label_names))
        click.echo("  labels: " + ", ".join(f"{i} {n} {c:,} ({c / max(1, counts.sum()):.2%})"
                                           for i, (n, c) in enumerate(zip(st.label_names, counts))))


@store.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def store_verify(path):
    """Check every shard file against its sha256 in the manifest."""
    from .activations import ActivationStore

    st = ActivationStore.open(path, verify="full")
    click.echo(f"ok: {st.n_shards} shards, every file matches its checksum")


@store.command("import")
@click.option("--a", "a", required=True, help="Model A's activations: .npy or .safetensors[:NAME], (n, d) or (n_seq, ctx, d).")
@click.option("--b", "b", required=True, help="Model B's activations on the same tokens (d may differ).")
@click.option("--ids", required=True, help="Token ids: (n,) for (n, d) rows, (n_seq, ctx) for per-position arrays.")
@click.option("--hook", required=True, help="Hook name of A's activations (SAEs are checked against it).")
@click.option("--hook-b", default=None, help="Hook name of B's when it differs from --hook.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory of the store.")
@click.option("--model-a", default="", help="Name recorded for model A [default: imported:FILE].")
@click.option("--model-b", default="", help="Name recorded for model B.")
@click.option("--lengths", default=None, help="Per-position arrays: (n_seq,) real tokens per sequence (rest is padding).")
@click.option("--bos", is_flag=True, help="Per-position arrays: position 0 of each sequence is BOS; leave it out.")
@click.option("--ctx", type=int, default=128, show_default=True, help="(n, d) rows: rows per sequence (split, contexts).")
@click.option("--heldout-every", type=int, default=10, show_default=True, help="Every N-th sequence is held out (0: none).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--shard-mb", type=float, default=32.0, show_default=True, help="Target shard size for the wider model.")
@click.option("--resume", is_flag=True, help="Finish an interrupted import in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def store_import(a, b, ids, hook, hook_b, out, model_a, model_b, lengths, bos, ctx, heldout_every, dtype, shard_mb,
                 resume, overwrite, quiet):
    """Build a store from activations computed elsewhere (nnsight, another cache), checked like a collected one.

    \b
    Example:
      diffkit store import --a acts_base.npy --b acts_chat.npy --ids tokens.npy \\
          --hook blocks.6.hook_resid_post --out runs/store --bos
      diffkit fit-map --acts runs/store --out runs/map

    Streams shard by shard (memory-mapped .npy, sliced .safetensors): the arrays are never loaded whole.
    """
    from .store_import import ImportConfig, import_store

    cfg = ImportConfig(a=a, b=b, ids=ids, hook_a=hook, hook_b=hook_b or hook, model_a=model_a, model_b=model_b,
                       lengths=lengths, bos=bos, ctx=ctx, heldout_every=heldout_every, dtype=dtype, shard_mb=shard_mb)
    s = import_store(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet, log=click.echo)
    click.echo(f"imported {s.tokens:,} tokens (train {s.train_tokens:,}, held-out {s.heldout_tokens:,}) in {s.shards} "
               f"shards, {_human_bytes(s.bytes)}, at {out}; scale A {s.scale_a:.4g} B {s.scale_b:.4g} (sqrt(d)/mean norm)")


@main.group()
def sae() -> None:
    """Train SAEs on activation stores (sae-lens's own trainer, sae-lens's format)."""


@sae.command("train")
@click.option("--acts", type=click.Path(path_type=Path), required=True, help="Activation store (collect / store import).")
@click.option("--source", type=click.Choice(["a", "b"]), required=True, help="Train on the store's model A or B.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output SAE directory (sae-lens format).")
@click.option("--arch", type=click.Choice(["topk", "batchtopk", "jumprelu", "standard"]), default="topk",
              show_default=True, help="sae-lens architecture (batchtopk is saved as jumprelu, as sae-lens does).")
@click.option("--d-sae", type=int, default=1024, show_default=True, help="Latents.")
@click.option("--k", type=int, default=24, show_default=True, help="Active latents per token (topk; batchtopk: mean).")
@click.option("--tokens", type=int, default=819_200, show_default=True,
              help="Training samples (steps x batch size); a smaller store is read for several epochs.")
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Tokens per step.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam learning rate (cosine decay at the end).")
@click.option("--sparsity-coefficient", type=float, default=None,
              help="L1 (standard) or L0 (jumprelu) coefficient [default: sae-lens's].")
@click.option("--no-normalize", is_flag=True, help="Train on raw activations instead of the store's normalized ones "
              "(the scale is folded into the saved weights either way).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the batch order.")
@click.option("--checkpoint-every", type=int, default=200, show_default=True, help="Steps between resumable checkpoints.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (its OUT.partial checkpoints).")
@click.option("--overwrite", is_flag=True, help="Replace an existing SAE in OUT (the old one stays until the new is done).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sae_train(acts, source, out, arch, d_sae, k, tokens, batch_size, lr, sparsity_coefficient, no_normalize, seed,
              checkpoint_every, device, threads, resume, overwrite, quiet):
    """Train an SAE on one model of a store; prints held-out FVE, L0 and dead fraction.

    \b
    Example (about 30 s on 2 cores):
      diffkit sae train --acts runs/store --source a --out runs/sae-a --d-sae 1024 --k 24
      diffkit sae train --acts runs/store --source a --out runs/sae-a-seed1 --seed 1   # the SAE-seed null
      diffkit align --sae-a runs/sae-a --sae-b runs/sae-b --acts runs/store --out runs/align

    The SAE reads raw activations (the store's normalization is folded in and recorded in cfg.json),
    so `diffkit align` and sae_lens.SAE.load_from_disk both use it as is. A killed run leaves
    OUT.partial: rerun the same command with --resume.
    """
    from .activations import ActivationStore
    from .sae_train import SAETrainConfig, train_sae_from_store

    if threads < 0:
        raise DiffkitError(f"--threads must be 0 or more, got {threads}")
    cfg = SAETrainConfig(arch=arch, d_sae=d_sae, k=k, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                         normalize=not no_normalize, sparsity_coefficient=sparsity_coefficient,
                         checkpoint_every=checkpoint_every)
    store = ActivationStore.open(acts)
    rec = train_sae_from_store(store, source, cfg, out, resume=resume, overwrite=overwrite, device=_device(device),
                               threads=threads or None, progress=not quiet, log=click.echo)
    m = rec["metrics"]
    click.echo(f"{arch} SAE {rec['d_in']}->{d_sae} on model {source.upper()} ({rec['hook_name']}), {rec['steps']:,} steps: "
               f"{m['eval_tokens']:,} {rec['inputs']['eval_split']} tokens: FVE {m['fve']:.3f}, L0 {m['l0']:.1f}, "
               f"dead {m['dead_fraction']:.1%}; {rec['seconds']:.0f} s; written to {out}")


@main.group()
def zoo() -> None:
    """The embedded tiny models and their SAEs (no downloads)."""


@zoo.command("list")
def zoo_list():
    """List the zoo models."""
    from .zoo import ARTIFACTS, LAST_HOOK, ORGANISMS, RECIPES, SAE_HOOK, ZOO_MODELS
    from .zoo.recipes import LAST_SAE_MODELS

    for name, recipe in RECIPES.items():
        built = "built" if (ARTIFACTS / name / "model").exists() else "not built"
        click.echo(f"zoo:{name:<11} d_model {recipe.d_model:<4} {recipe.description} [{built}]")
    click.echo(f"TopK SAEs (sae-lens format): {', '.join(ZOO_MODELS)} at {SAE_HOOK} (zoo:NAME, {ARTIFACTS}/NAME/sae); "
               f"{', '.join(LAST_SAE_MODELS)} at {LAST_HOOK} (zoo:NAME/blocks.1, NAME/sae-blocks.1); base also @seed1")
    for org in ORGANISMS.values():
        click.echo(f"organism {org.name:<9} zoo:{org.model_a} vs zoo:{org.model_b} on --corpus {org.corpus}: {org.planted}")
    from .zoo import smollm2

    click.echo(smollm2.list_line())


@zoo.command("info")
def zoo_info():
    """Held-out loss of each zoo model on prose and on code (recomputed now), and the organisms' behaviour."""
    import json

    import torch

    from .models import load_model
    from .zoo import ALL_MODELS, ARTIFACTS
    from .zoo.build import heldout_losses

    torch.set_num_threads(min(2, torch.get_num_threads()))
    click.echo(f"{'model':<16}{'prose':>8}{'code':>8}   (held-out next-token loss, nats/token; organisms: held-out "
               "behaviour from build.json, organism vs base)")
    build = json.loads((ARTIFACTS / "build.json").read_text()) if (ARTIFACTS / "build.json").exists() else {}
    for name in ALL_MODELS:
        if not (ARTIFACTS / name / "model").exists():
            click.echo(f"zoo:{name:<12} not built")
            continue
        loaded = load_model(f"zoo:{name}")
        losses = heldout_losses(loaded.model, loaded.model.cfg.n_ctx)
        fig = build.get(name, {}).get("behaviour")
        shown = "  " + ", ".join(f"{k} {v:.2f} vs {fig['base'][k]:.2f}" for k, v in fig["organism"].items()
                                 if isinstance(v, float)) if fig else ""
        click.echo(f"zoo:{name:<12}{losses['prose']:>8.3f}{losses['code']:>8.3f}{shown}")
    from .pipeline.stages import model_losses
    from .zoo import smollm2

    if not smollm2.is_available():
        click.echo(f"zoo:{smollm2.NAME:<12}{'n/a':>8}{'n/a':>8}   (optional, not installed: {smollm2.INSTALL_HINT})")
        return
    losses = model_losses(load_model("zoo:smollm2"), n_seqs=24)
    click.echo(f"zoo:smollm2     {losses['prose']:>8.3f}{losses['code']:>8.3f}   (own tokenizer: not comparable to the "
               "byte models)")


@zoo.command("build")
@click.argument("names", nargs=-1)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write (default: the package's own zoo/artifacts).")
@click.option("--saes-only", is_flag=True, help="Keep the trained models; retrain only their SAEs (~2 min).")
@click.option("--hook", "hooks", multiple=True, help="With --saes-only: only the SAEs at this hook (repeatable), "
              "e.g. --hook blocks.1.hook_resid_post (all ten blocks.1 SAEs: ~5 min on 2 cores).")
@click.option("--organisms", is_flag=True, help="Only the organisms (from the built base) and every model's "
              "blocks.1 SAE; the original models and their blocks.0 SAEs stay as they are.")
@click.option("--size", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="smollm2 only: the budget (cpu ~25 min on 2 cores; gpu >= 10M tokens, 16k SAEs).")
@click.option("--device", default=None, help="smollm2 only: torch device (default: the size's, cpu or cuda).")
@click.option("--threads", type=int, default=None, help="smollm2 only: torch threads (default: the size's).")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="smollm2 only: large artifacts (default runs/smollm2-SIZE); a rerun resumes there.")
@click.option("--overwrite", is_flag=True, help="smollm2 only: discard --work and start again.")
@click.option("--dry-run", is_flag=True, help="smollm2 only: check the GGUF, print the plan and sizes.")
def zoo_build(names, out, saes_only, hooks, organisms, size, device, threads, work, overwrite, dry_run):
    """Train the zoo models (all, or NAMES) and their SAEs from the fixed-seed recipes (~15 min on 2 cores,
    plus the organisms; `--organisms` builds only those and every model's blocks.1 SAE).

    `diffkit zoo build smollm2 --out DIR` instead fine-tunes SmolLM2-135M on Python source and runs the
    whole diff (SAEs, align, crosscoder, compare, report) on it and the original: the pipeline on its
    packaged config diffkit/pipeline/configs/smollm2-SIZE.toml (`diffkit run smollm2-cpu` does the same).
    """
    from .zoo import ALL_MODELS
    from .zoo.build import build_organisms, build_zoo

    if "smollm2" in names:  # the recipe is a pipeline config: `diffkit run smollm2-cpu` with these options
        import shlex

        from .pipeline.config import load_config, packaged
        from .pipeline.runner import plan_text, run_pipeline
        from .zoo import smollm2

        if len(names) > 1 or out is None:
            raise DiffkitError("build smollm2 on its own, with --out DIR (where report.md goes): "
                               "diffkit zoo build smollm2 --out DIR")
        smollm2.check_available()
        opts = {"out": str(out), "work": str(work) if work else None, "device": device, "threads": threads}
        cfg = load_config(packaged(f"smollm2-{size}"), {k: v for k, v in opts.items() if v is not None})
        if dry_run:
            click.echo(plan_text(cfg))
            return
        run_pipeline(cfg, log=click.echo, overwrite=overwrite, command="diffkit " + shlex.join(sys.argv[1:]))
        return
    for name in names:
        if name not in ALL_MODELS:
            raise DiffkitError(f"unknown zoo model {name!r}: choose from {', '.join(ALL_MODELS)}")
    if organisms:
        if names or saes_only:
            raise DiffkitError("--organisms builds a fixed set: drop the model names and --saes-only")
        build_organisms(out, log=click.echo)
        return
    if hooks and not saes_only:
        raise DiffkitError("--hook picks which SAEs --saes-only retrains: add --saes-only")
    from .zoo.recipes import LAST_SAE_RECIPE, SAE_RECIPE

    bad = [h for h in hooks if h not in (SAE_RECIPE.hook, LAST_SAE_RECIPE.hook)]
    if bad:
        raise DiffkitError(f"the zoo has no SAEs at {bad[0]!r}: use --hook {SAE_RECIPE.hook} or {LAST_SAE_RECIPE.hook}")
    build_zoo(list(names) or None, out, saes_only=saes_only, hooks=list(hooks) or None, log=click.echo)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/demo"), show_default=True,
              help="Where the report goes (report.md, figures/, tables/).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Where the (large, uncommitted) intermediate artifacts go.")
@click.option("--tokens", type=int, default=100_000, show_default=True, help="Tokens per activation store.")
@click.option("--cc-tokens", type=int, default=300_000, show_default=True, help="Training tokens per crosscoder.")
@click.option("--dict-size", type=int, default=2048, show_default=True, help="Crosscoder latents.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, work, tokens, cc_tokens, dict_size, quiet):
    """A model organism end to end on the zoo: does each method find a planted backdoor? (a few minutes on 2 cores)

    Three pairs (base vs backdoor at blocks.1, an SAE-seed control, a model-seed pair): collect,
    training-free diff, crosscoder, head to head, and the answer key (where each method ranks the
    planted features); writes reports/demo/report.md + figures/ + tables/.

    Example: diffkit demo --out reports/demo
    """
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(tokens=tokens, cc_tokens=cc_tokens, cc_dict_size=dict_size)
    run_demo(out, work, cfg, log=click.echo, progress=not quiet, command=_command_line())


@main.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan and the estimated sizes; run nothing.")
@click.option("--work", default=None, help="Override the config's work folder.")
@click.option("--out", default=None, help="Override the config's report folder.")
@click.option("--overwrite", is_flag=True, help="Discard the work folder and start again.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_config(config, dry_run, work, out, overwrite, quiet):
    """Two models to a report with one config file: collect, SAEs, map, align, crosscoder, compare, report.

    \b
    Example (copy diffkit/pipeline/configs/example.toml and edit it):
      diffkit run my.toml --dry-run     the plan, store bytes, SAE / crosscoder sizes
      diffkit run my.toml               run; run again to resume (a changed option reruns what it reaches)
    \b
    A stage that is done (WORK/stages/NAME.json) is kept; the resolved config is WORK/config.json.
    Activations you already have (`diffkit store import`): [data] store = "DIR" diffs that store as it is.
    """
    from .pipeline.config import load_config
    from .pipeline.runner import plan_text, run_pipeline

    cfg = load_config(config, {k: v for k, v in (("work", work), ("out", out)) if v})
    if dry_run:
        click.echo(plan_text(cfg))
        return
    run_pipeline(cfg, log=click.echo, progress=not quiet, overwrite=overwrite, command=f"diffkit run {config}")


@main.command("fit-map")
@click.option("--acts", type=click.Path(path_type=Path), required=True, help="Activation store (`diffkit collect` output).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory of the map.")
@click.option("--method", type=click.Choice(["lstsq", "ridge", "procrustes"]), default="lstsq", show_default=True,
              help="Affine least squares, ridge (needs --alpha), or orthogonal Procrustes (up to one scale).")
@click.option("--alpha", type=float, default=0.0, show_default=True, help="Ridge strength per token (ridge only).")
@click.option("--space", type=click.Choice(["raw", "normalized"]), default="raw", show_default=True,
              help="Fit on raw activations (what SAEs read) or on the store's normalized ones.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit_map(acts, out, method, alpha, space, quiet):
    """Fit affine maps A->B and B->A on the store's train split; score them on its held-out split.

    Streams the store once (float64 centered moments, memory O(d^2)) and solves in closed form.
    Writes map.safetensors + map.json (FVE = 1 - SSE/SST on held-out tokens, overall and per dim).
    """
    import warnings

    from .activations import ActivationStore
    from .linear_map import LinearMap

    store = ActivationStore.open(acts)
    lmap = LinearMap(method=method, alpha=alpha, space=space)
    lmap.config  # validates the options before the pass over the store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # echoed below from warnings_
        lmap.fit(store, progress=not quiet)
    for msg in lmap.warnings_:
        click.echo(f"warning: {msg}", err=True)
    lmap.save(out)
    click.echo(lmap.describe())
    if lmap.n_heldout_ == 0:
        click.echo("note: the store has no held-out tokens, so held-out FVE is NaN; collect with --heldout-every")
    click.echo(f"fit {lmap.fit_seconds_:.2f} s; map written to {out}")


@main.command()
@click.option("--sae-a", required=True, help="SAE of model A: sae-lens directory, .safetensors file, zoo:NAME[@seedN][/blocks.1], or RELEASE/SAE_ID.")
@click.option("--sae-b", required=True, help="SAE of model B (same kinds of SPEC).")
@click.option("--acts", type=click.Path(path_type=Path), required=True, help="Activation store of the two models.")
@click.option("--map", "map_dir", type=click.Path(path_type=Path), default=None,
              help="A `diffkit fit-map` output; fitted now (lstsq) and saved in OUT/map when omitted.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (FeatureDiff).")
@click.option("--threshold", type=float, default=None,
              help="Similarity below which an assigned pair is unmatched [default: 0.5, see diffkit.diff].")
@click.option("--cost", type=click.Choice(["cosine", "corr", "blend"]), default="cosine", show_default=True,
              help="Decoder cosine through the map, activation correlation, or a blend of both.")
@click.option("--blend", type=float, default=0.5, show_default=True, help="Weight of correlation in --cost blend.")
@click.option("--solver", type=click.Choice(["auto", "dense", "sparse"]), default="auto", show_default=True,
              help="Exact dense assignment, or the sparse top-k candidate graph (auto: sparse above 4096² pairs).")
@click.option("--k", type=int, default=32, show_default=True, help="Neighbours per feature in the sparse graph.")
@click.option("--rank-by", type=click.Choice(["act-mass", "enc-norm-robust", "enc-norm", "freq", "mean-act", "corr",
                                             "map-error"]),
              default="act-mass", show_default=True,
              help="Score that ranks the shared pairs (act-mass: centred log ratio of mean activation x decoder "
                   "norm; it finds planted strength changes that the encoder-norm difference misses).")
@click.option("--split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True,
              help="Tokens of the store used for the activation statistics.")
@click.option("--top", type=int, default=5, show_default=True, help="Features shown each way in the printed summary.")
@click.option("--fdr", type=float, default=0.1, show_default=True,
              help="False-discovery rate of the calibrated verdict (exclusive / changed calls; see diffkit.calibrate).")
@click.option("--null-sae-a", default=None, help="A second SAE of model A (another seed): the SAE-seed null.")
@click.option("--null-sae-b", default=None, help="A second SAE of model B (another seed): the SAE-seed null.")
@click.option("--no-calibrate", is_flag=True, help="Skip the model-level statistics, p/q-values and verdict.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def align(sae_a, sae_b, acts, map_dir, out, threshold, cost, blend, solver, k, rank_by, split, top, fdr, null_sae_a,
          null_sae_b, no_calibrate, device, quiet):
    """Training-free diff: pair A's SAE features with B's through the map; report shared, A-only, B-only.

    Writes features.parquet / features.csv (one row per pair or unmatched feature, every score),
    summary.json and config.json to OUT, and prints the top features each way with token contexts.
    """
    import warnings

    from .activations import ActivationStore
    from .diff import DEFAULT_THRESHOLD, AlignConfig, align as run_align, format_summary, save_diff
    from .linear_map import LinearMap
    from .saes import check_against_store, load_sae

    dev = _device(device)
    cfg = AlignConfig(threshold=DEFAULT_THRESHOLD if threshold is None else threshold, cost=cost, blend=blend,
                      solver=solver, k=k, rank_by=rank_by, split=split, device=dev, fdr=fdr, calibrate=not no_calibrate)
    store = ActivationStore.open(acts)
    lmap = LinearMap.load(map_dir) if map_dir is not None else None
    loaded_a, loaded_b = load_sae(sae_a), load_sae(sae_b)
    nulls = {s: load_sae(spec) for s, spec in (("a", null_sae_a), ("b", null_sae_b)) if spec}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # align() checks again and reports its notes in the summary
        check_against_store(loaded_a, store, "a"), check_against_store(loaded_b, store, "b")  # before any fit
        for side, null in nulls.items():
            check_against_store(null, store, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library returns its warnings; they are echoed below
        if lmap is None:
            lmap = LinearMap().fit(store, progress=not quiet)
            for msg in lmap.warnings_:
                click.echo(f"warning: {msg}", err=True)
        diff = run_align(store, loaded_a, loaded_b, lmap, cfg, progress=not quiet, null_saes=nulls)
    if map_dir is None:
        lmap.save(Path(out) / "map")
    save_diff(diff, out, {"acts": str(acts), "sae_a": sae_a, "sae_b": sae_b, "null_sae_a": null_sae_a,
                          "null_sae_b": null_sae_b,
                          "map": str(map_dir) if map_dir is not None else str(Path(out) / "map")})
    click.echo(format_summary(diff, top=top))
    click.echo(f"{diff.summary['seconds']['total']:.1f} s; FeatureDiff written to {out}")


@main.command()
@click.option("--acts", type=click.Path(path_type=Path), required=True, help="Activation store of the two models.")
@click.option("--map", "map_dir", type=click.Path(path_type=Path), default=None,
              help="A `diffkit fit-map` output; fitted now (lstsq) and saved in OUT/map when omitted.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--sae-a", default=None, help="SAE of model A (optional): its features are scored by the B->A error.")
@click.option("--sae-b", default=None, help="SAE of model B (optional): its features are scored by the A->B error.")
@click.option("--model-b", default=None, help="Model B, for the tokens the mean difference promotes through its "
              "unembedding [default: the store's model B if it loads; 'none' to skip].")
@click.option("--mode", type=click.Choice(["auto", "direct", "map"]), default="auto", show_default=True,
              help="Activation difference x_B - x_A (direct, same width) or x_B - map(x_A); auto: direct if it can.")
@click.option("--split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True)
@click.option("--top", type=int, default=200, show_default=True, help="Worst-mapped tokens kept (worst_tokens.csv).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def divergence(acts, map_dir, out, sae_a, sae_b, model_b, mode, split, top, quiet):
    """Where the two models disagree: the map's per-token error (worst tokens with contexts, features
    ranked by the error where they fire) and the mean activation difference (on decoder rows and
    through the unembedding). Training-free; writes config.json, divergence.safetensors,
    worst_tokens.csv, features_{a,b}.csv and summary.json to OUT."""
    import warnings

    from .activations import ActivationStore
    from .divergence import (DivergenceConfig, format_divergence, run_divergence, save_divergence, store_labels,
                             summarize, worst_tokens_frame)
    from .linear_map import LinearMap
    from .saes import load_sae

    cfg = DivergenceConfig(split=split, mode=mode, top_tokens=top)
    store = ActivationStore.open(acts)
    saes = [load_sae(s) if s else None for s in (sae_a, sae_b)]
    spec_b = model_b or store.manifest["sources"]["b"].get("spec")
    loaded_b = None
    if spec_b and spec_b != "none":
        from .models import load_model

        try:
            loaded_b = load_model(spec_b)
        except DiffkitError:
            if model_b:
                raise
            click.echo(f"note: the store's model B {spec_b!r} does not load here; pass --model-b for the unembedding")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmap = LinearMap.load(map_dir) if map_dir is not None else LinearMap().fit(store, progress=not quiet)
        res = run_divergence(store, lmap, cfg, *saes, model_b=loaded_b, progress=not quiet)
    if map_dir is None:
        lmap.save(Path(out) / "map")
    worst = worst_tokens_frame(store, res, split, cfg.window)
    summary = summarize(res, lmap, worst, store_labels(store, split))
    save_divergence(res, out, cfg, {"acts": str(acts), "map": str(map_dir or Path(out) / "map"), "sae_a": sae_a,
                                    "sae_b": sae_b, "model_b": spec_b if loaded_b is not None else None}, summary, worst)
    click.echo(format_divergence(res, summary, worst))
    click.echo(f"divergence written to {out}")


def _command_line() -> str:
    """The running command with the options that differ from their defaults (named in reports as the
    command that regenerates them)."""
    import shlex

    from click.core import ParameterSource

    ctx = click.get_current_context()
    words = ["diffkit", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) in (
                ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None) or value in (None, ()):
            continue
        for item in (value if param.multiple else [value]):
            words += [param.opts[0]] if param.is_flag else [param.opts[0], str(item)]
    return shlex.join(words)


@main.command()
@click.option("--align", "align_dir", type=click.Path(path_type=Path), required=True,
              help="A FeatureDiff: the --out of `diffkit align`.")
@click.option("--crosscoder", "cc_dir", type=click.Path(path_type=Path), required=True,
              help="A trained crosscoder: the --out of `diffkit crosscoder train`.")
@click.option("--acts", type=click.Path(path_type=Path), required=True, help="The store both were made from.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory: comparison.json, bridge table, crosscoder analysis, report.md, figures/, tables/.")
@click.option("--split", type=click.Choice(["heldout", "train", "all"]), default="heldout", show_default=True,
              help="Tokens for the crosscoder analysis and every FVE.")
@click.option("--tokens", type=int, default=200_000, show_default=True, help="At most this many tokens of the split.")
@click.option("--bridge-threshold", type=float, default=0.5, show_default=True,
              help="Decoder cosine below which a crosscoder latent and an SAE feature are no match.")
@click.option("--exclusive-r", type=float, default=0.1, show_default=True,
              help="Crosscoder A-only: r <= this; B-only: r >= 1 - this (r = n_B / (n_A + n_B)).")
@click.option("--top", type=int, default=8, show_default=True, help="Disagreements listed each way.")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(align_dir, cc_dir, acts, out, split, tokens, bridge_threshold, exclusive_r, top, threads, quiet):
    """Head to head: the training-free diff against the crosscoder on the same store, and its report.

    Matches the crosscoder's latents to each SAE's features (decoder cosine, one-to-one), scores how
    the two agree on exclusive features, their reconstruction (one FVE formula) and cost (wall time,
    FLOPs), and writes comparison.json + report.md + figures/ + tables/ to OUT.
    """
    from .compare import CompareConfig, compare as run_compare
    from .report import load_run, write_report

    cfg = CompareConfig(align=str(align_dir), crosscoder=str(cc_dir), acts=str(acts), out=str(out), split=split,
                        tokens=tokens, bridge_threshold=bridge_threshold, exclusive_r=exclusive_r, top=top)
    if threads:
        import torch

        torch.set_num_threads(threads)
    comp = run_compare(cfg, progress=not quiet)
    report = write_report(out, [load_run(out)], _command_line())
    from .report.markdown import fmt_num as f, human

    s = comp.summary
    for side in ("a", "b"):
        g = s["agreement"][side]
        click.echo(f"SAE {side.upper()}: {g['bridged']:,}/{g['features']:,} features bridged (median cos "
                   f"{f(g['bridge_cos_median'], 2)}); flags align {g['align_flags_bridged']:,}, crosscoder "
                   f"{g['cc_flags_bridged']:,}, both {g['both']:,}; Spearman {f(g['spearman_excl'])}")
    rec, cost = s["reconstruction"], s["cost"]["total"]
    click.echo(f"FVE SAEs {f(rec['sae']['a']['fve'])} / {f(rec['sae']['b']['fve'])}, crosscoder "
               f"{f(rec['crosscoder']['fve_a'])} / {f(rec['crosscoder']['fve_b'])} ({split} tokens)")
    click.echo(f"cost align {f(cost['align']['seconds'], 1)} s, {human(cost['align']['flops'], 'FLOP')}; crosscoder "
               f"{f(cost['crosscoder']['seconds'], 1)} s, {human(cost['crosscoder']['flops'], 'FLOP')}")
    click.echo(f"comparison written to {out}; report: {report}")


@main.command()
@click.option("--compare", "compare_dir", type=click.Path(path_type=Path), required=True,
              help="The main comparison: the --out of `diffkit compare`.")
@click.option("--control", "controls", type=click.Path(path_type=Path), multiple=True,
              help="A control comparison shown beside it (repeatable); one on an identical-model store is the "
                   "SAE-seed noise floor.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report directory [default: --compare].")
@click.option("--title", default="diffkit: head to head", show_default=True, help="Report title.")
def report(compare_dir, controls, out, title):
    """Write report.md + figures/*.png + tables/*.csv from comparison artifacts (no recomputation)."""
    from .report import load_run, write_report

    runs = [load_run(compare_dir)]
    for path in controls:
        run = load_run(path, role="control")
        st = run.summary["store"]
        if st["model_a"] == st["model_b"]:
            run.role = "sae-seed"
        runs.append(run)
    path = write_report(out or compare_dir, runs, _command_line(), title=title)
    click.echo(f"report written to {path}")


@main.group()
def bench() -> None:
    """Benchmarks of diffkit's stages, each against a baseline measured in the same run."""


@bench.command("collect")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/collect.md"),
              show_default=True, help="Where the markdown report goes.")
@click.option("--quick", is_flag=True, help="Smaller sizes (20k vs 100k tokens): a check that it runs, under a minute.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads, here and in every subprocess.")
def bench_collect(out, quick, threads):
    """Activation collection: hook capture vs run_with_cache, collect tokens/s and peak RSS, shuffled reads.

    The full run (100k vs 1M tokens) takes about 2 minutes on 2 idle cores, --quick under a minute;
    other CPU-heavy processes slow it a lot (the report says when it ran under load).
    """
    from .bench.collect import run_collect_benchmark
    from .bench.collect_report import write_collect_report

    result = run_collect_benchmark(quick=quick, threads=threads, log=click.echo)
    write_collect_report(result, out)
    early = result.forward.rows[0]
    click.echo(f"forward {early.hook}: {early.speedup:.2f}x run_with_cache; shuffled reads "
               f"{result.read.shuffled_gbps:.2f} GB/s ({result.read.shuffled_gbps / result.read.baseline_gbps:.2f}x "
               f"sequential np.load)")
    load = " (under load: other processes were busy)" if result.under_load else ""
    click.echo(f"{result.seconds:.0f} s{load}; report written to {out}")


@bench.command("align")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/align.md"),
              show_default=True, help="Where the markdown report goes.")
@click.option("--quick", is_flag=True, help="Small sizes (2,048 features, d 256): a check that it runs.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads in every measurement.")
@click.option("--skip-65k", is_flag=True, help="Leave out the 65,536-feature case (about 2 minutes).")
def bench_align(out, quick, threads, skip_65k):
    """Feature alignment at 16k and 65k features vs scipy's dense solver, and map-fit throughput vs GEMM.

    Each measured case runs in a fresh subprocess (peak RSS is a high-water mark). The full run
    takes ~5 minutes on 2 idle cores.
    """
    from .bench.align import run_align_benchmark
    from .bench.align_report import write_align_report

    result = run_align_benchmark(quick=quick, threads=threads, skip_65k=skip_65k, log=click.echo)
    write_align_report(result, out)
    click.echo(f"report written to {out}")


@bench.command("groundtruth")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/groundtruth"), show_default=True,
              help="Report directory: report.md, figures/, tables/, config.json.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/groundtruth"), show_default=True,
              help="Where the planted stores, SAEs and crosscoders go (~300 MB, uncommitted).")
@click.option("--quick", is_flag=True, help="Small sizes and a short sweep (about a minute): a check that it runs.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the planted pairs and of SAE A (B: +1).")
@click.option("--progress", is_flag=True, help="Show the training progress bars (stderr) besides a line per stage.")
def bench_groundtruth(out, work, quick, threads, seed, progress):
    """Both methods on planted pairs with a known answer: exclusive-feature AUROC and precision@k,
    shared matching accuracy, changed strength, a seed-pair control's false-positive rate, and a
    difficulty sweep (fraction exclusive, noise, superposition). About 3.5 minutes on 2 cores.

    Each case is the pipeline (`diffkit run`) on the packaged groundtruth config with data.store set to
    its planted store: WORK/CASE/store and WORK/CASE/pipeline hold every artifact it scored.
    """
    from .bench.groundtruth import GroundTruthConfig, run_groundtruth
    from .bench.groundtruth_report import format_groundtruth_summary, write_groundtruth_report

    cfg = (GroundTruthConfig.quick_config if quick else GroundTruthConfig)(threads=threads, seed=seed)
    result = run_groundtruth(cfg, out, work, log=lambda m: click.echo(m, err=True), progress=progress)
    path = write_groundtruth_report(result, out)
    click.echo(format_groundtruth_summary(result))
    click.echo(f"{result.seconds:.0f} s; report written to {path}")


@bench.command("organisms")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/organisms"), show_default=True,
              help="Report directory: report.md, figures/, tables/, summary.json, config.json.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("runs/organisms"), show_default=True,
              help="Stores and crosscoders (uncommitted); a rerun reuses complete stores.")
@click.option("--cases", default="", help="Comma-separated cases [default: all: backdoor, facts, code, cot, null, "
              "null_facts, sae_seed].")
@click.option("--quick", is_flag=True, help="Small stores and crosscoders: a check that it runs.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--hook", default="blocks.1.hook_resid_post", show_default=True,
              help="Hook of both models (blocks.0.hook_resid_post: the zoo's blocks.0 SAEs instead).")
def bench_organisms(out, work, cases, quick, threads, hook):
    """Every method on the model organisms, scored against their token-level answer key: precision@10/@50,
    first planted rank, AUROC, token AUROC, with the null and SAE-seed controls (~15 min on 2 cores)."""
    from .bench.organisms import CASES, OrganismsConfig, run_organisms
    from .bench.organisms_report import format_organisms_summary, write_organisms_report

    names = tuple(c.strip() for c in cases.split(",") if c.strip()) or tuple(CASES)
    cfg = (OrganismsConfig.quick_config if quick else OrganismsConfig)(threads=threads, cases=names, hook=hook)
    result = run_organisms(cfg, out, work, log=lambda m: click.echo(m, err=True))
    path, summary = write_organisms_report(result, out)
    click.echo(format_organisms_summary(summary))
    click.echo(f"{result['seconds']:.0f} s; report written to {path}")


@bench.command("gpu")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/gpu.md"), show_default=True,
              help="Markdown report; the figures go beside it as .json.")
@click.option("--quick", is_flag=True, help="Small sizes: a check that every CUDA path runs.")
@click.option("--deadline", type=float, default=480.0, show_default=True,
              help="Seconds after which the optional rows (compile, the 65k CPU baseline) are skipped.")
def bench_gpu(out, quick, deadline):
    """The CUDA paths on this machine's GPU: crosscoder training (bf16 / fp32, sparse / dense,
    prefetch, compile) and the assignment's GPU candidate search, against the card's own matmul
    rate measured in the same run. About 4 minutes on an H200; needs CUDA."""
    import tempfile

    from .bench.gpu import run_gpu_benchmark, write_gpu_report

    with tempfile.TemporaryDirectory() as tmp:
        result = run_gpu_benchmark(Path(tmp), quick=quick, deadline_s=deadline, log=click.echo)
    click.echo(f"report written to {write_gpu_report(result, out)}")


@bench.command("soak")
@click.option("--cycles", type=int, default=None, help="Kill/resume cycles per stage [default: 2 small, 10 --full].")
@click.option("--full", is_flag=True, help="The long run (~5 minutes, 30+ interruptions) behind the committed report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kill times.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads of every stage's process.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/soak.md"), show_default=True,
              help="Markdown report; the raw tally goes beside it as .json.")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Working folder (default: a temp dir).")
def bench_soak(cycles, full, seed, threads, out, work):
    """Soak run: collect, align and crosscoder train on the zoo SIGKILLed at random points, resumed until
    done, and compared with an uninterrupted run (store checksums, table contents, bitwise weights)."""
    import tempfile

    from .bench.machine import machine_info
    from .bench.soak import run_soak, soak_config
    from .bench.soak_report import write_soak_report

    if cycles is not None and cycles < 1:
        raise DiffkitError(f"--cycles must be at least 1, got {cycles}")
    cfg = soak_config("full" if full else "small", cycles=cycles, seed=seed, threads=threads)
    info = machine_info(threads)
    machine = f"{info.cpu_model}, {info.cpus_usable} usable cores, {threads} thread(s)"
    with tempfile.TemporaryDirectory(prefix="diffkit-soak-") as tmp:
        result = run_soak(cfg, Path(work) if work else Path(tmp), log=click.echo)
    import shlex

    command = "diffkit " + shlex.join(sys.argv[1:])  # as typed (_command_line names only the leaf group)
    path = write_soak_report(result, out, command, machine)
    bad = {k: sum(t[k] for t in result.tally().values()) for k in ("mismatches", "torn", "leftovers", "failures")}
    click.echo(f"{sum(t['interruptions'] for t in result.tally().values())} interruptions survived; {bad}; "
               f"{result.seconds:.0f} s; report written to {path}")


@bench.command("all")
@click.option("--full", is_flag=True, help="Every part at its full size, and the GPU benchmark where CUDA is present.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads in every part.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/README.md"),
              show_default=True, help="The summary report; summary.json goes beside it.")
@click.option("--only", default="", help="Comma-separated parts to run (the others are listed as not run).")
def bench_all(full, threads, out, only):
    """Every benchmark, each against its baseline from the same run, in one report.

    About 10 minutes on 2 cores (small size); one line per part with its time. Exit status 1 when a
    part failed or is missing.
    """
    from .bench.all import AllConfig, failed_parts, run_all, write_summary

    cfg = AllConfig(size="full" if full else "small", threads=threads, out=str(out),
                    only=tuple(n.strip() for n in only.split(",") if n.strip()))
    summary = run_all(cfg, log=click.echo)
    click.echo(f"{summary['seconds']:.0f} s in all; report written to {write_summary(summary, out)}")
    bad = failed_parts(summary)
    if bad:
        click.echo(f"error: {len(bad)} part(s) failed or missing: {', '.join(bad)} (see the report)", err=True)
        raise SystemExit(1)


@bench.command("scale")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/scale.md"), show_default=True,
              help="Markdown report; the figures go beside it as .json.")
@click.option("--full", is_flag=True, help="The issue's size: align on 16,384 and 65,536 features at d 2304, and a "
              "crosscoder store larger than RAM (~20 min on 2 cores, disk: 1.1 × RAM).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads in every measurement.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Scratch directory for stores and SAEs (default: a temporary directory, emptied after).")
def bench_scale(out, full, threads, work):
    """Whole `diffkit align` on wide planted SAEs (vs scipy dense) and a 32k-latent crosscoder's peak memory on two
    store sizes. Default size about 2.5 minutes on 2 cores."""
    import tempfile

    from .bench.scale import run_scale_benchmark
    from .bench.scale_report import write_scale_report

    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffkit-scale-", dir=work) as tmp:
        result, rows = run_scale_benchmark("full" if full else "small", Path(tmp), threads=threads, log=click.echo)
    md, js = write_scale_report(result, rows, out)
    click.echo(f"{result.seconds:.0f} s; report written to {md} (+ {js.name})")


from baselines.crosscoder.cli import bench_crosscoder, crosscoder  # noqa: E402  (crosscoder baseline)
main.add_command(crosscoder)
bench.add_command(bench_crosscoder)
from diffkit.experiments.cli import experiment  # noqa: E402  (the toy experiment series)
main.add_command(experiment)


if __name__ == "__main__":
    main()
