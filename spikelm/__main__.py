"""``python -m spikelm``: the ``spikelm`` command (the multi-process launchers start each rank this way)."""

import sys

from spikelm.commands.main import main

sys.exit(main())
