"""Applications built on the fastgrad core: the CLI, training demos, the benchmark harness,
datasets, the validator, and the benchmark configurations and floors they share.

``import fastgrad`` does not import this package; import its modules directly, e.g.
``from fastgrad.tools import configs``.
"""
