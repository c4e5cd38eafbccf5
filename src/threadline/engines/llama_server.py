"""The helper process that holds the local model: llama.cpp's own HTTP server (xllamacpp.Server).

Run as `python -m threadline.engines.llama_server` by engines/local.py, never by hand. It reads
one JSON line of settings from stdin, loads the model, prints `{"url": ...}` (or `{"error": ...}`)
on stdout, then serves until stdin closes: the parent closing the pipe, exiting or being killed all
end it, so no model server outlives the Threadline process that started it.

Why a process of its own and not a thread: xllamacpp's `Server(...)` constructor holds the GIL for
the whole load (measured: a Python thread ticking every 10 ms got 1 tick in 1.07 s without warmup,
1 tick in 8.2 s with llama.cpp's default warmup), so loading it in a worker thread would still
freeze the event loop and every other conversation. Out here it blocks nobody.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(sys.stdin.readline() or "{}")
    try:
        import xllamacpp
    except ImportError:
        print(json.dumps({"error": 'xllamacpp is not installed (pip install "threadline[local]")'}), flush=True)
        return 1
    p = xllamacpp.CommonParams()
    p.model.path = spec["model_path"]
    n_parallel = max(1, int(spec.get("n_parallel") or 1))
    p.n_parallel = n_parallel
    # Every slot gets the whole context window (kv_unified off), so packing's budget holds per turn
    # whatever else runs at the same time (SmolLM2-135M: 180 MiB of KV cache per 8k-token slot).
    p.n_ctx = int(spec["n_ctx"]) * n_parallel
    p.kv_unified = False
    p.hostnames = ["127.0.0.1"]  # loopback only
    p.port = 0                   # the kernel picks a free port; listening_address reports it
    p.api_keys = [spec["api_key"]]  # a per-process secret: other local users' processes and web pages get 401
    p.ui = False
    p.warmup = False             # saves ~5 s of startup; the first turn pays ~0.1 s instead
    p.fit_params = False         # a CPU-only memory probe that costs 0.5 s and changes nothing here
    p.cache_ram_mib = int(spec.get("cache_ram_mib") or 256)  # llama.cpp's default is 8 GiB of prompt cache
    p.verbosity = 1              # errors only, on stderr (the parent keeps the last lines for its log)
    threads = int(spec.get("threads") or 0)
    if threads > 0:
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
    try:
        server = xllamacpp.Server(p)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"url": server.listening_address}), flush=True)
    sys.stdin.read()  # serve until the parent closes the pipe (or dies, which closes it too)
    del server        # stops llama.cpp's server loop and frees the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
