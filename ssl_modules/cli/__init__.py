"""``python -m ssl_modules fit|validate|evaluate|export`` (the ``ssl-modules`` console script)."""
from ssl_modules.cli.app import main

__all__ = ["main"]
