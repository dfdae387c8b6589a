import sys

from megatron_cpt.cli import main

sys.exit(main())
