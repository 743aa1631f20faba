"""``diffkit experiment NAME|all --out DIR``: the toy experiment series (torch is imported inside)."""

from __future__ import annotations

from pathlib import Path

import click

NAMES = ("seeds", "data", "architecture", "objective", "width", "scale-up")


@click.command("experiment")
@click.argument("name", metavar="NAME|all")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/experiments"), show_default=True,
              help="Directory for the reports: OUT/NAME/report.md (+ figures/, tables/, config.json), OUT/index.md.")
@click.option("--quick", is_flag=True, help="One repetition, short training, no zoo part: a check that it runs.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads.")
def experiment(name, out, quick, threads):
    """Run a toy experiment (seeds, data, architecture, objective, width, scale-up) or all of them.

    Each trains small networks on CPU (digits / mnist1d, generated offline), maps their latents onto
    each other both ways, and writes a markdown report with figures and CSV tables. `all` takes about
    ten minutes on 2 cores and also writes OUT/index.md.
    """
    from diffkit.errors import DiffkitError

    if threads < 1:
        raise DiffkitError(f"--threads must be at least 1, got {threads}")
    from .runner import run_experiments

    run_experiments(name, out, quick=quick, threads=threads, log=click.echo)
