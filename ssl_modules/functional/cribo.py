"""cribo functional core (see shared/parity/cribo/README.md)."""

__all__: list[str] = []
