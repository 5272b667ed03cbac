"""The content-addressed stage store: stage folders, manifests, locks, integrity checks, stage logs."""
