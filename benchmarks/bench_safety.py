"""Safety-chain benchmark: the gateway over the local engine with the default filter chain on vs off.

    python benchmarks/bench_safety.py [--clients 1,16] [--repeats 3] [--json out.json]

Same model (bench_serve's random tiny Llama), same engine, same gateway, same load (``C`` concurrent streaming
clients, ``--requests-per-client`` completions each, a fixed token-id prompt, exactly ``--output-len`` tokens):
only the filter chain differs. The chain is the red-team chain (``llmforge.serve.safety.redteam.
REDTEAM_FILTERS``: a five-phrase evasion-aware blocklist and every PII kind, both directions); it is swapped in
and out of the one running gateway, and the two settings alternate run by run so that load from other
processes on the machine hits them alike (the median of ``--repeats`` runs is kept).

Reported per setting: output tokens/s, p50/p99 time to first token (the first *released* text: with the chain
on this includes the hold-back), p50 inter-chunk latency. The ratio chain-on / chain-off throughput is the
figure to watch (target ≥ 0.90). A random tiny model writes byte soup with almost no spaces, which the PII
filter holds as a possible e-mail or key up to its 64-character window: its TTFT is the worst case. So the
benchmark also streams benign prose (the red-team set's) through the chain alone, one character per push, and
reports the chain's CPU time per push and the characters it holds back on average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import load, make_model  # benchmarks/ is not a package


def chain_costs(chain) -> dict:
    """Engine-free: the red-team set's benign prose streamed one character per push through the chain; the
    chain's CPU time per push and how many characters it holds back on average (the streaming delay)."""
    import time

    from llmforge.serve.filters import RequestContext
    from llmforge.serve.safety.redteam import load_set

    texts = [i["text"] for i in load_set() if i["category"] == "benign/general"] * 5
    held, pushes = 0, 0

    async def run() -> float:
        nonlocal held, pushes
        t0 = time.perf_counter()
        for text in texts:
            out, sent = chain.output(RequestContext("b", "chat", "bench"), 0), 0
            for i, ch in enumerate(text):
                v = await out.push(ch)
                sent += len(v.text)
                held += i + 1 - sent
                pushes += 1
            await out.finish()
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    return {"us_per_push": round(wall / pushes * 1e6, 1), "mean_chars_held": round(held / pushes, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting and concurrency (median kept)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from llmforge.infer import load_engine
    from llmforge.manifest.serve import SafetyConfig
    from llmforge.serve.gateway import create_app
    from llmforge.serve.safety import build_chain
    from llmforge.serve.safety.redteam import REDTEAM_FILTERS
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-safety-"))
    model_dir = make_model(work, args.hidden, args.layers, max_len=args.prompt_len + args.output_len + 16)
    prompt = [5 + (i * 7) % 200 for i in range(args.prompt_len)]
    settings = GatewaySettings(served_model_name="bench", max_tokens=args.output_len, max_n=1)
    chain = build_chain(SafetyConfig.model_validate({"filters": REDTEAM_FILTERS}))
    on = list(chain.filters)
    engine = load_engine(model_dir, device="cpu", dtype="float32", max_batch=max(clients),
                         max_queue=max(clients) * 4, model_name="bench")  # fmt: skip
    results: dict[str, list[dict]] = {"chain off": [], "chain on": []}
    with BackgroundServer(create_app(engine, settings, filters=chain)) as srv:
        pids = [os.getpid()]
        asyncio.run(load(srv.url, "bench", 1, 1, prompt, args.output_len, pids))  # warm-up
        for c in clients:
            runs: dict[str, list[dict]] = {name: [] for name in results}
            for _ in range(args.repeats):
                for name in results:
                    chain.filters = on if name == "chain on" else []
                    runs[name].append(
                        asyncio.run(
                            load(srv.url, "bench", c, args.requests_per_client, prompt, args.output_len, pids)
                        )
                    )
            for name, rs in runs.items():
                rs.sort(key=lambda r: r["output_tokens_per_s"])
                r = rs[len(rs) // 2] | {"runs_tokens_per_s": [x["output_tokens_per_s"] for x in rs]}
                results[name].append(r)
                print(f"{name:>10} C={c:<3} {r}", flush=True)
    ratios = {
        f"C={c}": round(
            results["chain on"][i]["output_tokens_per_s"] / results["chain off"][i]["output_tokens_per_s"], 3
        )
        for i, c in enumerate(clients)
    }
    print("throughput chain on / off:", json.dumps(ratios))
    chain.filters = on
    costs = chain_costs(chain)
    print("chain on benign prose, 1 character per push:", json.dumps(costs))
    meta = {"model": {"hidden": args.hidden, "layers": args.layers}, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "threads": args.threads, "cpus": os.cpu_count(),
            "filters": [f.name for f in on]}  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, **results, "ratio_on_off": ratios, "prose": costs}, indent=2)
        )


if __name__ == "__main__":
    main()
