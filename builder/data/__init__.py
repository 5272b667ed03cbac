"""Documents, splits, tokenization on Ray Data, sharded token blocks, seeded shuffles."""
