"""The run machinery: exact resume, stop signals, the non-finite guard, performance options, collectives whose
backward sums over processes, and the rules for optional parts (probes, pictures) under DDP."""
