import torch

# CI has 2 cores; keep every test deterministic and single-process unless it says otherwise.
torch.manual_seed(0)
