"""One pipeline from two models to a report: ``diffkit run CONFIG.toml``.

- :mod:`.config`  the TOML file -> frozen dataclasses, checked strictly (unknown key / wrong type: one-line error);
- :mod:`.stages`  finetune, losses, collect, saes, map, align, crosscoder, compare, report: one job each,
  through the library calls the single commands use;
- :mod:`.runner`  runs them in order with resumable markers, reruns what a changed option reaches, plans (--dry-run);
- :mod:`.report`, :mod:`.smollm2_report`  the preambles of the head-to-head report.

``diffkit demo`` and ``diffkit zoo build smollm2`` are this pipeline on the configs in ``configs/``.
"""
