"""`heft serve RUN`: load a finished run (a run folder, hf://USER/REPO, or a `heft export` folder), start the
batching engine, and serve the OpenAI API (heft.serve.app) with uvicorn until SIGTERM or Ctrl-C.

Shutting down: the first SIGTERM (or SIGINT) makes every new request a 503, lets the engine finish every request it
has admitted or queued (each bounded by --timeout), lets uvicorn write their last bytes, and the process exits 0.
A second signal stops at once.

`--port 0` binds a free port; either way the server prints one line on stdout once it accepts connections,
`heft serve: listening on http://HOST:PORT`, for scripts and tests to read.

The limit of scoring through a text API with ReFT (why `local-completions` scores differ from `heft lm-eval` when
reft.positions.last > 0) is explained in heft.serve.app's docstring.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from heft.errors import ConfigError

try:
    import uvicorn
except ImportError:  # pragma: no cover - the extra is installed wherever the tests run
    raise ConfigError("heft serve needs FastAPI and uvicorn, an optional extra: pip install 'heft[serve]'") from None

logger = logging.getLogger(__name__)


def _check_args(args: argparse.Namespace) -> None:
    """Every bad flag in one message, each with its fix."""
    bad = []
    if not 0 <= args.port <= 65535:
        bad.append(f"--port {args.port}: give 0 (a free port) to 65535")
    if args.max_concurrent < 1:
        bad.append(f"--max-concurrent {args.max_concurrent}: give at least 1")
    if args.max_queue < 0:
        bad.append(f"--max-queue {args.max_queue}: give 0 or more")
    if args.max_new_tokens < 1:
        bad.append(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        bad.append(f"--max-prompt-tokens {args.max_prompt_tokens}: give at least 1, or leave it out (the model's "
                   "context length)")
    if not args.timeout > 0:
        bad.append(f"--timeout {args.timeout}: give a positive number of seconds")
    if bad:
        raise ConfigError("heft serve: " + "; ".join(bad))


def _model_name(run: str) -> str:
    """The id clients send by default: hf://USER/REPO gives USER/REPO, a folder its name."""
    if run.startswith("hf://"):
        return run[len("hf://"):].strip("/")
    return Path(run).resolve().name


def _context_length(model: Any) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError("heft serve: the model's config has no max_position_embeddings, so the context length is "
                          "unknown; give --max-prompt-tokens")
    return n


def serve_command(args: argparse.Namespace) -> int:
    """Run the server until it is told to stop; 0 after a clean shutdown."""
    _check_args(args)

    import heft
    from heft.serve.app import ServeSettings, create_app
    from heft.serve.engine import Engine

    model, tokenizer = heft.load(args.run, allow_other_base=args.allow_other_base)
    try:
        context = _context_length(model)
    except ConfigError:
        if args.max_prompt_tokens is None:
            raise
        context = args.max_prompt_tokens + args.max_new_tokens
    if args.max_prompt_tokens is not None and args.max_prompt_tokens > context:
        raise ConfigError(f"heft serve: --max-prompt-tokens {args.max_prompt_tokens} is more than the model's context "
                          f"of {context} tokens; give at most {context}")
    settings = ServeSettings(model_name=args.model_name or _model_name(str(args.run)), context_length=context,
                             max_prompt_tokens=args.max_prompt_tokens or context, max_new_tokens=args.max_new_tokens,
                             timeout=args.timeout)
    engine = Engine(model, tokenizer, max_concurrent=args.max_concurrent, max_queue=args.max_queue)
    engine.start()
    try:
        app = create_app(model, tokenizer, engine, settings)
        sock = _bind(args.host, args.port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        _Server(config, app, engine, drain_timeout=args.timeout + 10.0).run(sockets=[sock])
    finally:
        engine.shutdown(drain=False, timeout=10.0)  # already drained after a signal; this stops the thread
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"heft serve: cannot listen on {host}:{port} ({e.strerror}); pick another --port, or 0 for "
                          "a free one") from None


class _Server(uvicorn.Server):
    """uvicorn's server with heft's shutdown: on the first signal, refuse new requests (503) and drain the
    engine on a helper thread, then let uvicorn close; a second signal stops at once. The signal is not
    re-raised after serving (uvicorn's default), so a drained shutdown exits 0."""

    def __init__(self, config: Any, app: Any, engine: Any, drain_timeout: float):
        super().__init__(config)
        self.api, self.engine, self.drain_timeout = app, engine, drain_timeout
        self.draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        for sock in sockets or []:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"heft serve: listening on http://{shown}:{port}", flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:
            self.force_exit = self.should_exit = True
            return
        self.draining = True
        self.api.state.closing = True
        threading.Thread(target=self._drain, name="heft-serve-drain", daemon=True).start()

    def _drain(self) -> None:
        print("heft serve: stopping: finishing the requests in flight (a second signal stops at once)",
              file=sys.stderr, flush=True)
        try:
            self.engine.shutdown(drain=True, timeout=self.drain_timeout)
        except Exception:  # the process is stopping either way; say why it may not have drained
            logger.exception("heft serve: the engine did not shut down cleanly")
        self.should_exit = True
