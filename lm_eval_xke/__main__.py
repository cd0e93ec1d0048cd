import sys

from lm_eval_xke.cli import main

sys.exit(main())
