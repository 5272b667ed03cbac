"""The teach stage's work: the teacher's stored top-k signal, the pass that writes it, its Ray actors."""
