import sys

from ctok.cli import main

sys.exit(main())
