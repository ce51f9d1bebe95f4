"""fastgrad's asv suite (see docs/benchmarks.md, section "asv"): per quantity × backend ×
configuration, ``time_*``, ``peakmem_*``, and ``track_*`` for the ratio to the floors and
for cold and cached compile time."""
