"""The model LoRA adapts: the built-in base, pretrained once and cached (`pretrain`), or the user's checkpoint, and
its own losses on a study's texts, computed once per study (`evals`)."""
