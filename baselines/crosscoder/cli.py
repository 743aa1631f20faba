"""``diffkit crosscoder {train,analyze}`` and ``diffkit bench crosscoder``: parse, call, print.

Registered in :mod:`diffkit.cli`; torch and the training code are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from diffkit.errors import DiffkitError


@click.group()
def crosscoder() -> None:
    """Crosscoder baseline: one sparse dictionary trained on both models' activations."""


@crosscoder.command("train")
@click.option("--acts", required=True, type=click.Path(path_type=Path), help="ActivationStore (diffkit collect --out).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (artifact + checkpoints).")
@click.option("--arch", type=click.Choice(["l1", "batchtopk"]), default="batchtopk", show_default=True)
@click.option("--dict-size", type=int, default=4096, show_default=True, help="Number of latents.")
@click.option("--k", type=int, default=32, show_default=True, help="batchtopk: mean active latents per token.")
@click.option("--l1", "l1", type=float, default=1.0, show_default=True, help="l1: sparsity coefficient λ (warmed up).")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Adam peak learning rate.")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Global batch (all processes).")
@click.option("--tokens", type=int, default=0, help="Training tokens (default: one epoch of the train split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Init and batch-order seed.")
@click.option("--dead-after-tokens", type=int, default=0,
              help="batchtopk: a latent silent this long is dead and gets the auxiliary loss (0: --tokens / 10, "
                   "at most 10M).")
@click.option("--dec-init-norm", type=float, default=0.0, help="Decoder row norm per source at init (0: 0.08 l1, 0.1 batchtopk).")
@click.option("--dense", is_flag=True, help="batchtopk: dense decoder/backward instead of the sparse path.")
@click.option("--log-every", type=int, default=50, show_default=True, help="Steps between metrics lines.")
@click.option("--eval-every", type=int, default=0, help="Steps between held-out evaluations (0: at the end).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints (0: none).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training step.")
@click.option("--no-autocast", is_flag=True, help="CUDA: train in fp32 instead of bf16 autocast.")
@click.option("--prefetch", type=int, default=2, show_default=True,
              help="CUDA: batches gathered ahead on a background thread (0: off).")
@click.option("--wandb", default="", help="Log to this wandb project (needs wandb installed).")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(acts, out, arch, dict_size, k, l1, lr, batch_size, tokens, seed, dead_after_tokens, dec_init_norm,
              dense, log_every, eval_every, checkpoint_every, device, compile_, no_autocast, prefetch, wandb, threads,
              resume, quiet):
    """Train a crosscoder on an activation store (several processes: run under torchrun).

    \b
    Example:
      diffkit crosscoder train --acts runs/store --out runs/cc --dict-size 4096 --k 32
      torchrun --nproc-per-node 2 -m diffkit.cli crosscoder train --acts runs/store --out runs/cc
    """
    from diffkit.devices import resolve_device as _device

    from .train import TrainConfig, train

    cfg = TrainConfig(acts=str(acts), out=str(out), arch=arch, dict_size=dict_size, k=k, l1=l1, lr=lr,
                      batch_size=batch_size, tokens=tokens, seed=seed, dead_after_tokens=dead_after_tokens,
                      dec_init_norm=dec_init_norm, sparse=not dense, log_every=log_every, eval_every=eval_every,
                      checkpoint_every=checkpoint_every, device=_device(device), compile=compile_,
                      autocast=not no_autocast, prefetch=prefetch, wandb=wandb)
    summary = train(cfg, resume=resume, progress=not quiet, threads=threads or None, log=click.echo)
    if summary.get("world_size", 1) > 1:
        import torch.distributed as dist

        # Every rank waits until rank 0 has written the artifact, then the group is closed: a rank
        # that exits with gloo's threads still running aborts ("terminate called without an
        # active exception"), which torchrun reports as a failed run.
        dist.barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    held = summary["heldout"]
    figs = "  ".join(f"{key} {val:.4f}" for key, val in held.items() if key.startswith("fve_"))
    click.echo(f"trained {summary['steps']:,} steps ({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s on "
               f"{summary['world_size']} process(es); held-out {figs}  L0 {held.get('l0', float('nan')):.1f}")
    click.echo(f"crosscoder written to {out} (cfg.json + crosscoder.safetensors)")


@crosscoder.command("analyze")
@click.option("--crosscoder", "cc", required=True, type=click.Path(path_type=Path), help="A trained crosscoder dir.")
@click.option("--acts", required=True, type=click.Path(path_type=Path), help="The store it was trained on.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where the LatentTable goes.")
@click.option("--split", type=click.Choice(["heldout", "train", "all"]), default="heldout", show_default=True)
@click.option("--tokens", type=int, default=200_000, show_default=True, help="At most this many tokens analysed.")
@click.option("--exclusive-r", type=float, default=0.1, show_default=True,
              help="r = n_B/(n_A+n_B) at most this: A-only; at least 1 - this: B-only.")
@click.option("--top", type=int, default=5, show_default=True, help="Top latents shown each way.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze_cmd(cc, acts, out, split, tokens, exclusive_r, top, quiet):
    """Per-latent table (relative norms, labels, Latent Scaling) and a summary of a crosscoder."""
    from .analysis import AnalyzeConfig, analyze

    if not 0 < exclusive_r < 0.5:
        raise DiffkitError(f"--exclusive-r must be between 0 and 0.5, got {exclusive_r}")
    s = analyze(AnalyzeConfig(crosscoder=str(cc), acts=str(acts), out=str(out), split=split, tokens=tokens,
                              exclusive_r=exclusive_r, top_n=top), progress=not quiet)
    click.echo(f"{s['arch']} crosscoder, {s['dict_size']} latents, {s['tokens']:,} {s['split']} tokens")
    click.echo(f"FVE A {s['fve_a']:.4f}  B {s['fve_b']:.4f}   (1 - Σ‖x-x̂‖²/Σ‖x-μ‖²)   L0 {s['l0']:.1f}   "
               f"dead {100 * s['dead_frac']:.1f}%")
    click.echo("labels (r = n_B/(n_A+n_B)): " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    click.echo(f"sharedness {s['sharedness']:.3f}   CCA activations {s['cca_activations']:.3f}   "
               f"CCA decoders {_fmt(s['cca_decoders'])}   (1 = identical models)")
    for lab, rows in s["top"].items():
        for row in rows:
            ctx = row["contexts"][0]["text"].replace("\n", "⏎") if row["contexts"] else ""
            click.echo(f"  {lab:<6} latent {row['latent']:>6}  freq {row['freq']:.4f}  r {row['rel_norm_r_b']:.3f}  "
                       f"ν_err {_fmt(row['nu_err'])}  {ctx[:70]!r}")
    click.echo(f"LatentTable: {out}/latents.parquet (+ .csv), summary: {out}/summary.json")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@click.command("crosscoder")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/benchmarks/crosscoder.md"),
              show_default=True, help="Where the markdown report goes.")
@click.option("--quick", is_flag=True, help="Small dictionaries and few steps: a check that it runs.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--zoo-store", type=click.Path(path_type=Path), default=None,
              help="Zoo base/finetuned store for the FVE run (default: collected into runs/bench-crosscoder).")
def bench_crosscoder(out, quick, threads, zoo_store):
    """Crosscoder training speed vs this machine's fp32 matmul rate, peak memory, and the zoo FVE run."""
    from .bench import run_benchmark

    path = run_benchmark(out, quick=quick, threads=threads, zoo_store_path=zoo_store, log=click.echo)
    click.echo(f"report written to {path}")
