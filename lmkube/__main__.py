import sys

from lmkube.cli import main

sys.exit(main())
