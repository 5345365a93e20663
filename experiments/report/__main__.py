import sys

from experiments.report.markdown import main

sys.exit(main())
