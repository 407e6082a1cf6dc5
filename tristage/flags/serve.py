"""`tristage serve`: the OpenAI-compatible server (run by tristage/serve/server.py:main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tristage.config import arg
from tristage.flags.base import device_problem, dtype_problem
from tristage.io import UserError


@dataclass
class Config:
    """Serve model folders over an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions,
    streaming or not), several models at once by name, with continuous batching: requests that arrive while others
    decode join the running batch at the next step. Any OpenAI client works: point its base_url at
    http://HOST:PORT/v1. With --db, the same process also serves the web pages (chat, arena votes, annotations)
    and stores the votes in that SQLite file."""

    models: list[str] = arg(help="model folders to serve; NAME=PATH names one (default: the folder's name, its "
                                 "parent's for a folder called model); clients pick one by name in `model`",
                            positional=True)
    host: str = arg("127.0.0.1", help="address to listen on; 127.0.0.1 (the default) is this machine only, 0.0.0.0 "
                                      "every network interface")
    port: int = arg(8000, check="[1, 65535]", help="TCP port to listen on")
    api_key: str | None = arg(None, help="require `Authorization: Bearer KEY` on /v1/* (401 without it), and the key "
                                         "on the web pages' calls too (they ask for it once and keep it as a "
                                         "cookie); default: the TRISTAGE_API_KEY environment variable, else no key")
    db: str | None = arg(None, help="SQLite file for the web pages' votes and annotations; with it the pages are "
                                    "served at /, without it only the API")
    max_batch: int = arg(32, check=">=1", help="rows decoded together per engine process at most (n > 1 takes n "
                                              "rows); more requests wait for a row")
    replicas: int = arg(0, check=">=0", help="engine processes per model, each decoding its own rows; a request goes "
                                             "to the one with the fewest in flight. 0: 2 for a CPU model where there "
                                             "are 2 CPUs or more (a decode step is many small ops that one thread "
                                             "runs best: two engines use two cores where one engine's second "
                                             "thread does not), else 1. Each packs its own copy of the linear "
                                             "layers' weights")
    threads: int = arg(0, check=">=0", help="CPU threads of each engine process (torch intra-op threads); 0: the "
                                            "number of CPUs minus one (with --prefill-process, minus its threads "
                                            "too: a third of the rest, at least one), shared among the replicas, at "
                                            "least one each; the CPU left is the HTTP process's (tokens to text, "
                                            "sending events)")
    prefill_process: Literal["auto", "on", "off"] = arg(
        "off", help="prefill prompts in a process of their own beside each model's engine process, so a prompt's "
                    "forward pass and the decode steps run on different cores: on | off | auto (on for a CPU model "
                    "where there are 2 CPUs or more). Off by default: on 2 shared cores it moved tokens/s by -13 "
                    "to +11 percent between runs and added ~10-20 ms to the time to first token (bench/RESULTS.md)")
    device: str = arg("cpu", check=device_problem, help="cpu, cuda, cuda:1, mps, or auto")
    dtype: str = arg("float32", check=dtype_problem, help="float32, bfloat16, float16, or auto")
    log_level: str = arg("info", help="the server's log level: critical, error, warning, info, debug")

    def check_flags(self) -> None:
        if not self.models:
            raise UserError("MODELS: give at least one model folder")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise UserError(f"--log-level must be critical, error, warning, info or debug (got {self.log_level!r})")
