"""One compressed-tensors variant of one checkpoint, made by llm-compressor in the quantizer's own
environment (`.venv-quantize`, which `make setup` creates: llm-compressor pins a
compressed-tensors and transformers that vLLM's main environment cannot hold).

    .venv-quantize/bin/python builder/models/quantize_main.py request.json

The request (written by builder.models.quantizer_env.run_quantizer): model_dir, out_dir, scheme
(builder.models.variants.SCHEMES), group_size (w4a16), calibration (a safetensors file with an
int64 `input_ids` [blocks, seq_len], or null) and result (where this writes its facts as JSON).
Run as a file, not as `-m builder...`: it imports nothing of minizoo, whose dependencies this
environment does not have. No quantization algorithm of its own: llm-compressor's modifiers do it.
"""
from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

# The packages whose versions decide the output: recorded in the variant's manifest.
RECORDED_PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch")
# lm_head stays in the checkpoint's dtype, as llm-compressor's own examples keep it: it is the
# most quantization-sensitive layer, and a tied one is the embedding as well.
IGNORED = ["lm_head"]


def recipe(scheme: str, group_size: int | None):
    """llm-compressor's modifier for one scheme. W8A8 and FP8 are round-to-nearest weights
    (per output channel) with activations quantized per token at run time: there is no
    activation scale to calibrate and 8-bit per-channel rounding loses little, so they take no
    calibration data. W4A16 is GPTQ, which needs the layers' inputs (calibration data) to
    correct the rounding of 4-bit weights, per group of `group_size` input channels."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme == "w8a8-int8":
        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=IGNORED)
    if scheme == "fp8-dynamic":
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORED)
    if scheme == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
        return GPTQModifier(ignore=IGNORED, config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    raise ValueError(f"unknown scheme {scheme!r}; known: w8a8-int8, w4a16, fp8-dynamic")


def calibration_dataset(path: str):
    """The family's calibration blocks as a tokenized dataset (llm-compressor tokenizes nothing)."""
    from datasets import Dataset
    from safetensors.torch import load_file

    ids = load_file(path)["input_ids"]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})


def quantize(request: dict) -> dict:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    # the checkpoint's own dtype (bf16 for a family's members): what stays unquantized keeps it
    model = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype="auto")
    calibration = {}
    if request["calibration"]:
        dataset = calibration_dataset(request["calibration"])
        calibration = {"dataset": dataset, "num_calibration_samples": len(dataset),
                       "max_seq_length": len(dataset[0]["input_ids"]), "shuffle_calibration_samples": False}
    oneshot(model=model, recipe=recipe(request["scheme"], request["group_size"]), **calibration)
    model.save_pretrained(request["out_dir"], save_compressed=True)
    AutoTokenizer.from_pretrained(request["model_dir"]).save_pretrained(request["out_dir"])
    return {"seconds": round(time.time() - started, 1), "calibration_blocks": len(calibration.get("dataset", ())),
            "packages": {name: metadata.version(name) for name in RECORDED_PACKAGES}}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[1]).read_text())
    facts = quantize(request)
    Path(request["result"]).write_text(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
