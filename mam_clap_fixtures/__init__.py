"""Test and demo fixtures; not runtime code (nothing in :mod:`mam_clap_plugin` imports this).

* :mod:`.clap`: randomly initialised CLAP checkpoints in the real LAION-CLAP / MS-CLAP
  layouts (``save_random_clap_checkpoint``), for the tests, the demo and the benchmarks;
* :mod:`.speech`: spoken words from eSpeak NG (the ``espeakng-loader`` wheel), rendered
  reproducibly in a fresh worker process;
* :mod:`.signals`: the signal steps shared by the demo generators (placing a word in a
  clip, background noise and level, int16 quantisation, band-limited noise).

Installed next to ``mam_clap_plugin`` (``setup.py``) so that the tests and the scripts of
``examples/`` import it like any package.
"""
