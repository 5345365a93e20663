"""From rows to answers: studies grouped from the results file (`studies`), paired statistics (`stats`), the
recommendation rule (`recommend`), the literature's expectations (`expectations`), number formats (`fmt`), plots
(`plots`) and report.md (`markdown`). `python -m experiments.report RUN_DIR` rewrites the report."""
