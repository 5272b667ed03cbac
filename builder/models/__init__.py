"""Architecture tables, checkpoint loading and saving, the teacher (acquisition, GGUF conversion),
the next-token NLL with the LM head over chunks of positions (next_token_nll), the quantized
variants' schemes (variants) and their quantizer, llm-compressor in its own environment
(quantizer_env, quantize_main)."""
