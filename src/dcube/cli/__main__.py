import sys

from dcube.cli import main

sys.exit(main())
