"""The floor for an event loop's cost per request: aiohttp on uvloop that only parses the
same JSON body (orjson) and answers a small JSON. Benchmark-only.

A loop's CPU per request falls as its request rate rises (more requests per wakeup and
per system call), so the floor only compares at the same rate: `--delay-ms` holds every
answer back so that the benchmark's 64 closed-loop clients drive it at batcher's rate.
Its /metrics gives what the load generator's server breakdown reads: the loop thread's CPU
(`batcher_event_loop_cpu_seconds_total`) and the requests answered, under the name the
breakdown counts requests by (`batcher_queue_wait_seconds_count`).

    python -m bench.baselines.bare_server --port 8002 [--delay-ms 40]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from aiohttp import web

from batcher.metrics import LoopThreadCPU

ANSWER = orjson.dumps({"intent_id": 1, "intent_name": "闲聊", "confidence": 0.9})


def create_app(delay_s: float) -> web.Application:
    answered = 0
    loop_cpu = LoopThreadCPU()  # created on the loop's thread: it reads that thread's CPU

    async def predict(request: web.Request) -> web.Response:
        nonlocal answered
        body = orjson.loads(await request.read())
        if not isinstance(body, dict) or "turns" not in body:
            raise web.HTTPUnprocessableEntity()
        if delay_s:
            await asyncio.sleep(delay_s)
        answered += 1
        return web.Response(body=ANSWER, content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        text = (
            f"batcher_event_loop_cpu_seconds_total {loop_cpu.seconds() or 0.0}\n"
            f"batcher_queue_wait_seconds_count {answered}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(port: int, delay_s: float) -> None:
    runner = web.AppRunner(create_app(delay_s), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold every answer this long (default: 0)")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
