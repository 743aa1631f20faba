import subprocess
import sys
import time

from click.testing import CliRunner

from diffkit import __version__
from diffkit.cli import main


def test_help_and_version_are_fast():
    """`diffkit --help` must not import torch/sae-lens: a fresh interpreter answers in < 1 s."""
    for args in (["--help"], ["--version"]):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "diffkit.cli", *args], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
        assert elapsed < 1.0, f"diffkit {args[0]} took {elapsed:.2f} s"
    out = subprocess.run([sys.executable, "-m", "diffkit.cli", "--version"], capture_output=True, text=True).stdout
    assert __version__ in out


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from click.testing import CliRunner; from diffkit.cli import main; "
            "CliRunner().invoke(main, ['collect', '--help']); "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'sae_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_help():
    runner = CliRunner()
    for args in (["collect"], ["store", "info"], ["store", "verify"], ["zoo", "list"], ["zoo", "info"],
                 ["zoo", "build"], ["demo"]):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output
