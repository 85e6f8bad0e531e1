"""`python -m cloudtaskd.ctl`: the same as the cloudtaskctl console script."""

import sys

from cloudtaskd.ctl.main import main

sys.exit(main())
