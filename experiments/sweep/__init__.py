"""Runs and their rows: what a study runs (`plan`), the checks before any of it starts (`preflight`), how runs are
started (`executors`: one at a time, N at once, a Ray cluster; `runners`: a subprocess or this process), the
results file (`results`), and the sweep that drives them without losing work (`sweep`)."""
