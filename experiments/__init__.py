"""The ablation lab: configs, the built-in base (pretrain), one fine-tuning run (finetune), sweeps and their
results, statistics, studies, expectations, the report and its plots. The engine it drives is in `training/`."""
