"""Minitron importance, structured cuts, and the architecture search over candidate shapes."""
