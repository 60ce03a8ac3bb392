"""``python -m mridc.firmware_sim.demo``."""

import sys

from .run import main

sys.exit(main())
