"""How to run a build: run options (and their CLI flags), the training precision, cluster sizing."""
