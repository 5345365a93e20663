"""The training engine the lab drives: the loop, checkpoints, distributed setup, memory accounting, metrics.

It knows nothing of configs, sweeps or reports (nothing here imports from the lab), so a benchmark or a user's
own script can train with it directly.
"""
