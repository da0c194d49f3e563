import sys

from halfclose.cli.main import main

sys.exit(main())
