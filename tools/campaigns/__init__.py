"""Kill and fault campaigns: real sweeps in child processes, killed or faulted like Colab runtimes.

``python -m tools.campaigns.kill --runs 100 --seed 1`` and ``python -m tools.campaigns.fault``.
They check what a user on a new runtime would see, with sqlite3, Optuna and sweepsafe's
public API only.
"""
