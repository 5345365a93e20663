"""One fine-tuning run: a config in, a trained adapter and one result out (`train.train_run`), its result keys
(`row`), and the lock that gives a run folder one owner at a time (`locks`). `python -m experiments.finetune` runs
one in this process; a sweep starts it that way for each of its runs."""
