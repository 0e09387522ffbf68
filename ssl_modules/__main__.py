import sys

from ssl_modules.cli.app import main

sys.exit(main())
