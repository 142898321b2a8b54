import sys

from heft.cli import main

sys.exit(main())
