"""Architecture tables, checkpoint loading and saving, the teacher (acquisition, GGUF conversion)."""
