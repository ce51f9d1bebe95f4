"""fastgrad's asv suite (see docs/benchmarks.md, section "asv"): per quantity × backend ×
configuration, ``time_*``, ``peakmem_*``, and ``track_*`` for the ratio to the floors and
for cold and cached compile time.

Job: the history, commit by commit (``asv run``, ``asv continuous``). The other timing
harnesses each have their own: ``fastgrad bench`` (fastgrad.tools.bench) compares every
backend with the peers and the floors in one run; ``cpu_targets.py`` A/Bs a CPU-kernel
change against PyTorch and the floors; ``gpu_check.py``/``gpu_check.sh`` do the same on a GPU.
``cpu_targets.py`` and ``gpu_check.py`` are scripts, not asv benchmarks (asv imports them
and finds none); configurations and floors come from fastgrad.tools.configs, of which
``_problems.py`` keeps a frozen copy for old commits.
The scripts share their timing loops through ``_timing.py``
(a helper, as ``_problems.py``: asv finds no benchmark in it)."""
