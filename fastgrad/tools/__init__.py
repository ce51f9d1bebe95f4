"""Applications built on the fastgrad core; they use only its public names.

- ``cli``: the ``fastgrad`` command (compare, train, sweep, validate, bench).
- ``train``: training with the true gradient, the shortcuts and DP-SGD; the shortcut sweep.
- ``datasets``: spirals, scikit-learn's digits, the user's ``.npz``.
- ``validate``: every backend against the float64 reference (``fastgrad validate``).
- ``bench``: the peer comparison (``fastgrad bench``).
- ``configs``: docs/design.md §6's benchmark configurations, problem builder and floors, the one
  source of every timing harness.
- ``plotting``: matplotlib, headless (optional packages come through the core's
  ``fastgrad.extras``, which names the extra to install).

``import fastgrad`` imports none of these; import them directly, e.g.
``from fastgrad.tools import configs``.
"""
