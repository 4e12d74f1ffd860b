import sys

from crisp_edge.cli.main import main

sys.exit(main())
