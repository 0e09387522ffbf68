"""vicregl functional core (see shared/parity/vicregl/README.md)."""

__all__: list[str] = []
