"""Architecture tables, checkpoint loading and saving, the teacher (acquisition, GGUF conversion),
the next-token NLL with the LM head over chunks of positions (next_token_nll)."""
