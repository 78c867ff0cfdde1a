import sys

from blt.cli import main

sys.exit(main())
