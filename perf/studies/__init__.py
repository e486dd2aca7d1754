"""Studies whose answers the runtime keeps as small rules (each module says which)."""
