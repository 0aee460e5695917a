"""Crawl throughput against a local site: pages/s stored by llmforge's crawler.

    python benchmarks/bench_crawl.py [--pages 2000] [--concurrency 16] [--links 5]

The site runs in its own process (an asyncio HTTP/1.1 keep-alive server) so it does not compete with the
crawler for the GIL. Each page links to ``--links`` others; robots.txt allows everything; per-host delay is 0,
so the numbers measure the crawler's own cost: scheduling, HTTP, link extraction, WARC writing (gzip +
digests) and the per-page SQLite commit.

For scale, the same URLs are then fetched by a bare ``httpx.AsyncClient`` loop at the same concurrency (no
parsing, no WARC, no state): the ceiling for an httpx-based crawler on this machine and server.
Results go to stdout as a table and to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _page(i: int, n: int, links: int) -> bytes:
    hrefs = "".join(
        f'<li><a href="/p{(i * 7 + k * 13 + 1) % n}.html">page {k}</a></li>' for k in range(links)
    )
    text = f"<p>Page {i} of the benchmark site. " + "Lorem ipsum dolor sit amet. " * 20 + "</p>"
    return (
        f"<!DOCTYPE html><html><head><title>p{i}</title></head><body><h1>p{i}</h1>{text}<ul>{hrefs}</ul>"
        f"</body></html>"
    ).encode()


def _serve(port: int, n: int, links: int, ready: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    pages = {f"/p{i}.html": _page(i, n, links) for i in range(n)}
    pages["/"] = _page(0, n, links)
    robots = b"User-agent: *\nAllow: /\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if path == "/robots.txt":
                    body, ctype, status = robots, b"text/plain", b"200 OK"
                elif path in pages:
                    body, ctype, status = pages[path], b"text/html; charset=utf-8", b"200 OK"
                else:
                    body, ctype, status = b"not found", b"text/plain", b"404 Not Found"
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: "
                    + ctype
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _bare_fetch(urls: list[str], concurrency: int) -> float:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for u in urls:
        queue.put_nowait(u)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                url = queue.get_nowait()
                r = await client.get(url)
                r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--links", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from llmforge.data.crawl import crawl
    from llmforge.manifest import CrawlSection

    port = _free_port()
    ready = mp.Event()
    server = mp.Process(target=_serve, args=(port, args.pages, args.links, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(10):
            raise SystemExit("benchmark server did not start")
        base = f"http://127.0.0.1:{port}"
        cfg = CrawlSection(
            seeds=[base + "/"],
            max_pages=args.pages + 1,
            max_depth=10_000,
            per_host_delay_s=0.0,
            concurrency=args.concurrency,
            per_host_concurrency=args.concurrency,
            warc_max_bytes=50_000_000,
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            report = crawl(cfg, tmp)
            wall = time.perf_counter() - t0
            warc_bytes = sum(p.stat().st_size for p in Path(tmp, "warc").glob("*.warc.gz"))
        urls = [f"{base}/p{i}.html" for i in range(args.pages)]
        bare = asyncio.run(_bare_fetch(urls, args.concurrency))
    finally:
        server.terminate()
        server.join()

    result = {
        "pages": report.pages_stored,
        "requests": report.requests_this_run,
        "concurrency": args.concurrency,
        "crawl_wall_s": round(wall, 2),
        "crawl_pages_per_s": round(report.pages_stored / wall, 1),
        "warc_mb": round(warc_bytes / 1e6, 2),
        "bare_httpx_wall_s": round(bare, 2),
        "bare_httpx_pages_per_s": round(len(urls) / bare, 1),
        "python": sys.version.split()[0],
    }
    rows = [
        (
            "llmforge crawl (robots, scope, links, WARC, state)",
            result["crawl_pages_per_s"],
            result["crawl_wall_s"],
        ),
        ("bare httpx GET loop (ceiling)", result["bare_httpx_pages_per_s"], result["bare_httpx_wall_s"]),
    ]
    print(f"{args.pages} pages, {args.links} links/page, concurrency {args.concurrency}, per-host delay 0")
    print(f"{'':54} {'pages/s':>9} {'wall s':>8}")
    for name, rate, secs in rows:
        print(f"{name:54} {rate:>9.1f} {secs:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
