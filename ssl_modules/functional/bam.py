"""bam functional core (see shared/parity/bam/README.md)."""

__all__: list[str] = []
