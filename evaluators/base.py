"""The evaluator interface: what lm-eval, perplexity and vLLM throughput have in common.

    evaluator = get_evaluator("perplexity")                  # evaluators.registry
    model = ModelHandle("runs/x/student-0")                  # nothing loaded yet
    record = evaluator.run(model, PerplexitySettings(65536, heldout=blocks_dir), "cpu")
    work = evaluator.estimate(PerplexitySettings(65536), model_config, COSTS, seq_len=2048)

An evaluator measures one model with typed, frozen settings on a device and returns a record,
a JSON-able dict whose shape its `run` documents (a stage stores it in its manifest as is).
Its estimate says what that costs before anything runs (builder.planning.cost_model's `Work`:
tokens, FLOPs and its own start-up; the stage adds its process start and the checkpoint read).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, TypeVar

from builder.planning.cost_model import Costs, Work
from evaluators import model_loading

Settings = TypeVar("Settings")
Record = dict[str, Any]  # JSON-able; each evaluator's `run` documents its keys


class ModelHandle:
    """A checkpoint to evaluate: its folder, and the module and tokenizer read from it on first
    use and kept, so that evaluators run one after another on a model share one load (what
    runs in another process, like vLLM, reads only `path`).

    With `engine_args` (the vllm.LLM arguments, as evaluators.vllm_worker makes them) the model
    is served by vLLM instead of transformers: `served()` starts one engine on first use, which
    lm-eval and perplexity then share (a quantized variant is measured in the engine that
    serves it). Only a vLLM worker process passes them (evaluators.vllm_worker.evaluate)."""

    def __init__(self, path: str | Path, name: str | None = None, dtype: str = "float32",
                 engine_args: dict[str, Any] | None = None):
        self.path = Path(path)
        self.name = name or self.path.name  # how messages and work folders call the model
        self.dtype = dtype
        self.engine_args = engine_args
        self._module, self._device, self._tokenizer, self._vllm = None, None, None, None

    @property
    def engine(self) -> str:
        return "transformers" if self.engine_args is None else "vllm"

    def module(self, device: str):
        """The model on `device`, loaded the first time it is asked for."""
        self._only("transformers")
        if self._module is None:
            self._module, self._device = model_loading.load_model(self.path, device=device, dtype=self.dtype), device
        elif device != self._device:
            raise ValueError(f"model {self.name!r} is loaded on {self._device!r}, not on device={device!r}: "
                             "evaluate it on one device, or make a ModelHandle per device")
        return self._module

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = model_loading.load_tokenizer(self.path)
        return self._tokenizer

    def served(self, start: Callable[[dict[str, Any]], Any]):
        """The engine serving this checkpoint (evaluators.vllm_engine.lm_eval_vllm), started by
        `start(engine_args)` the first time it is asked for and shared by the evaluators after."""
        self._only("vllm")
        if self._vllm is None:
            self._vllm = start(dict(self.engine_args))
        return self._vllm

    def _only(self, engine: str) -> None:
        if self.engine != engine:
            raise ValueError(f"model {self.name!r} is served by {self.engine}, not {engine}")


class Evaluator(ABC, Generic[Settings]):
    """One way to measure a model. A subclass names itself (`name`, its key in
    evaluators.registry), its settings class (`settings_type`, a frozen dataclass) and
    implements `run` and `estimate`."""

    name: ClassVar[str]
    settings_type: ClassVar[type]

    @abstractmethod
    def run(self, model: ModelHandle, settings: Settings, device: str) -> Record:
        """Measure `model` on `device` ("cpu", "cuda") and return the record."""

    @abstractmethod
    def estimate(self, settings: Settings, model_config, costs: Costs, seq_len: int) -> Work:
        """What `run` will do for a model of `model_config` (a transformers config), before it
        runs: tokens, FLOPs and the evaluator's own start-up in `costs`' terms. `seq_len`: the
        family's block length (the held-out blocks')."""
