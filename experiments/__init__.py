"""The experiment scripts, importable as modules (``from experiments import common, runner``).

Each script also runs as a file from the repository root (``python experiments/sinusoid.py``)
or as a module (``python -m experiments.sinusoid``).
"""
