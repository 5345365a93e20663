"""`python -m bench.train`: a LoRA training step, ours against transformers + PEFT. The command line and modes
(`cli`), contenders (`steps`), the interleaved comparison (`compare`), timing and FLOPs (`measure`), memory in a
fresh process per contender (`memory`), the printed table (`table`), and `python -m bench.train.profile`."""
