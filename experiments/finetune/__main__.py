import sys

from experiments.finetune.train import main

sys.exit(main())
