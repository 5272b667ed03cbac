"""The family spec: what to build (the pydantic schema, shapes, batch layout, rehearsal scaling)."""
