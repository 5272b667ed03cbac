"""GGUF files measured in llama.cpp's own server (llama-server), started on 127.0.0.1.

    with LlamaServer(gguf_file, threads=2, log_path=work / "server.log") as server:
        server.complete([1, 2, 3], n_predict=8)      # llama-server's /completion answer
        server.next_token_logprobs([1, 2, 3])        # {token id: log-probability}, the top 5

    record = LlamaServerThroughput().run(ModelHandle(gguf_file), LlamaServerRun(workload, work), "cpu")

The server runs in a process group of its own that dies with the thread that started it
(evaluators.process_tree): it is killed whole when the measurement ends, and a pid file beside
its log lets a later run stop one that survived a killed stage. The throughput workload is the
family's (`throughput:` input_len, output_len, num_prompts) as vLLM runs it
(evaluators.throughput): num_prompts prompts of input_len seeded random token ids, output_len
generated tokens each (end-of-sequence ignored), greedy; timed passes after an untimed one, their
mean output tokens/s and its spread. llama-server takes one request at a time here (`-np 1`): a
single-user server, as llama.cpp is mostly run.
"""
from __future__ import annotations

import json
import random
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.models.llama_cpp import LLAMA_CPP_TOOL, binary, llama_cpp_problem
from builder.planning.cost_model import Costs, Work, forward_flops_per_token
from evaluators.base import Evaluator, ModelHandle, Record
from evaluators.process_tree import PidFile, die_with_parent, kill_group, libc_prctl

HOST = "127.0.0.1"
_HEALTH_POLL_S = 0.2
_LOG_TAIL_LINES = 15


class LlamaServerError(RuntimeError):
    """llama-server did not start, did not become healthy, or failed a request."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server on 127.0.0.1 serving one GGUF file, for the length of a `with` block."""

    def __init__(self, gguf_file: Path, threads: int, log_path: Path, context: int = 2048,
                 start_timeout_s: float = 120.0, request_timeout_s: float = 600.0):
        self.gguf_file, self.threads, self.log_path = Path(gguf_file), threads, Path(log_path)
        self.context, self.start_timeout_s, self.request_timeout_s = context, start_timeout_s, request_timeout_s
        self.port, self.proc = None, None
        self.pid_file = PidFile(self.log_path.with_suffix(".pid"))

    def command(self) -> list[str]:
        return [str(binary("llama-server")), "--host", HOST, "--port", str(self.port), "-m", str(self.gguf_file),
                "-t", str(self.threads), "-np", "1", "-c", str(self.context), "--no-webui"]

    def __enter__(self) -> "LlamaServer":
        problem = llama_cpp_problem()
        if problem:
            raise LlamaServerError(problem)
        self.pid_file.clean()  # one a killed run left behind
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        libc_prctl()  # looked up here: the forked child calls it without entering the dynamic loader
        with open(self.log_path, "ab") as log:
            # its own process group, killed whole; SIGKILLed by the kernel if this thread dies first
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self.pid_file.write(self.proc.pid)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.proc.wait()
            self.pid_file.path.unlink(missing_ok=True)
            self.proc = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlamaServerError(f"llama-server exited with status {self.proc.returncode} before it was healthy, "
                                       f"serving {self.gguf_file}; {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if json.load(answer).get("status") == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass  # not listening yet, or 503 while it loads the model
            time.sleep(_HEALTH_POLL_S)
        raise LlamaServerError(f"llama-server was not healthy {self.start_timeout_s:.0f} s after it started, serving "
                               f"{self.gguf_file}; {self.log_tail()}")

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "the last lines of its log:\n" + "\n".join(lines[-_LOG_TAIL_LINES:])

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as answer:
                return json.load(answer)
        except urllib.error.URLError as err:
            raise LlamaServerError(f"llama-server's {path} failed serving {self.gguf_file}: {err}; "
                                   f"{self.log_tail()}") from err

    def complete(self, prompt: list[int] | str, n_predict: int, **options: Any) -> dict:
        """Greedy generation of exactly `n_predict` tokens (end-of-sequence ignored) after `prompt`."""
        return self.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                                         "ignore_eos": True, "cache_prompt": False, **options})

    def next_token_logprobs(self, ids: list[int], top: int = 5) -> dict[int, float]:
        """The `top` likeliest next tokens after `ids` and their log-probabilities, from the model's
        raw softmax (no sampler in between): what llama.cpp computes, to compare with another runtime."""
        answer = self.post("/completion", {"prompt": ids, "n_predict": 1, "n_probs": top, "temperature": 0,
                                           "post_sampling_probs": False, "cache_prompt": True})
        return {entry["id"]: entry["logprob"] for entry in answer["completion_probabilities"][0]["top_logprobs"]}

    def version(self) -> str:
        with urllib.request.urlopen(f"{self.url}/props", timeout=10) as answer:
            return str(json.load(answer).get("build_info", ""))


@dataclass(frozen=True)
class LlamaServerWorkload:
    """The family's throughput workload (spec `throughput:`), and the timed passes over it."""

    input_len: int = 128
    output_len: int = 128
    num_prompts: int = 32
    passes: int = 3
    warmup_passes: int = 1
    seed: int = 0


@dataclass(frozen=True)
class LlamaServerRun:
    """One GGUF file's measurement: the workload, the server's CPU threads and the folder its log
    goes to (None where nothing runs: the estimate needs only the workload)."""

    workload: LlamaServerWorkload
    work_dir: Path | None = None
    threads: int = 1


def prompts(workload: LlamaServerWorkload, vocab_size: int) -> list[list[int]]:
    """num_prompts prompts of input_len token ids, the same for every model of a vocabulary."""
    rng = random.Random(workload.seed)
    return [[rng.randrange(vocab_size) for _ in range(workload.input_len)] for _ in range(workload.num_prompts)]


class LlamaServerThroughput(Evaluator[LlamaServerRun]):
    name = "llama-server-throughput"
    settings_type = LlamaServerRun

    def run(self, model: ModelHandle, settings: LlamaServerRun, device: str) -> Record:
        """`model.path` is a GGUF file. Record: output_tokens_per_s (the timed passes' mean: the
        output tokens of a whole pass over its wall time, requests one after another),
        output_tokens_per_s_std (their sample standard deviation), per_pass (each pass's rate),
        server_decode_tokens_per_s (llama-server's own mean decoding rate, prompt processing
        excluded), passes, num_prompts, input_tokens and output_tokens (per pass), threads,
        server_start_s, engine ("llama-server"), tool and server_build. llama.cpp runs on the
        CPU here: `device` is not passed on."""
        if settings.work_dir is None:
            raise ValueError(f"LlamaServerRun.work_dir is None: pass a folder for llama-server's log measuring "
                             f"{model.name!r}")
        workload, started = settings.workload, time.monotonic()
        with LlamaServer(model.path, settings.threads, settings.work_dir / "llama-server.log",
                         context=workload.input_len + workload.output_len) as server:
            server_start_s = time.monotonic() - started
            vocab = _vocab_size(server)
            batch = prompts(workload, vocab)
            for _ in range(workload.warmup_passes):
                _pass(server, batch, workload.output_len)
            passes = [_pass(server, batch, workload.output_len) for _ in range(workload.passes)]
            build = server.version()
        rates = [p["output_tokens_per_s"] for p in passes]
        return {"engine": "llama-server", "tool": LLAMA_CPP_TOOL, "server_build": build,
                "output_tokens_per_s": statistics.mean(rates),
                "output_tokens_per_s_std": statistics.stdev(rates) if len(rates) > 1 else None,
                "per_pass": rates,
                "server_decode_tokens_per_s": statistics.mean(p["decode_tokens_per_s"] for p in passes),
                "passes": len(passes), "num_prompts": workload.num_prompts,
                "input_tokens": passes[0]["input_tokens"], "output_tokens": passes[0]["output_tokens"],
                "threads": settings.threads, "server_start_s": round(server_start_s, 2)}

    def estimate(self, settings: LlamaServerRun, model_config, costs: Costs, seq_len: int) -> Work:
        """Every pass (warm-up included) forwards num_prompts sequences of input_len + output_len
        tokens; one server start (about a stage's start)."""
        workload = settings.workload
        length = workload.input_len + workload.output_len
        tokens = workload.num_prompts * length * (workload.passes + workload.warmup_passes)
        return Work(tokens, tokens * forward_flops_per_token(model_config, length), costs.stage_start_s)


def _vocab_size(server: LlamaServer) -> int:
    """The served model's vocabulary (llama-server's /props: its model metadata)."""
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as answer:
        meta = json.load(answer)["data"][0].get("meta", {})
    return int(meta["n_vocab"])


def _pass(server: LlamaServer, batch: list[list[int]], output_len: int) -> dict:
    started = time.perf_counter()
    answers = [server.complete(prompt, output_len) for prompt in batch]
    elapsed = time.perf_counter() - started
    output = sum(answer["tokens_predicted"] for answer in answers)
    decode_ms = sum(answer["timings"]["predicted_ms"] for answer in answers)
    return {"output_tokens_per_s": output / elapsed, "decode_tokens_per_s": output / (decode_ms / 1000),
            "input_tokens": sum(answer["tokens_evaluated"] for answer in answers), "output_tokens": output}
