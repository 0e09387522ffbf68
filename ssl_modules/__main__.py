import sys

from ssl_modules.cli import main

sys.exit(main())
