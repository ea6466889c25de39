"""A demo application: realistic log records at a human pace.

``serve --demo`` runs it inside the relay process so a newcomer sees traffic at
once.  The records imitate a small web shop: HTTP access lines, database timings,
payment calls, a background worker, with the odd warning, error and traceback.
Nothing here is copied from a real log corpus.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final

import trio

from .agent import Agent
from .records import Level

__all__ = ["demo_records", "run_demo"]

_PATHS: Final = [
    "/",
    "/cart",
    "/checkout",
    "/api/items",
    "/api/items/{id}",
    "/login",
    "/search",
    "/static/app.js",
]
_USERS: Final = ["ada", "grace", "linus", "margaret", "ken", "barbara", "guido", "anonymous"]
_THREADS: Final = ["http-1", "http-2", "http-3", "http-4", "worker-1", "scheduler"]
_ITEMS: Final = ["teapot", "kettle", "mug", "saucer", "infuser", "tea-tin"]

_TRACEBACK: Final = """Traceback (most recent call last):
  File "/srv/shop/payments.py", line 88, in charge
    response = await gateway.post("/v2/charges", json=payload, timeout=5.0)
  File "/srv/shop/gateway.py", line 41, in post
    raise GatewayTimeout(f"{self.name} did not answer within {timeout}s")
shop.gateway.GatewayTimeout: card-gateway did not answer within 5.0s"""


def demo_records(rng: random.Random) -> Iterator[tuple[Level, str, str, str, str | None, dict[str, str]]]:
    """Endless (level, logger, thread, message, exception, fields) tuples."""
    order = 1000
    while True:
        roll = rng.random()
        thread = rng.choice(_THREADS[:4])
        user = rng.choice(_USERS)
        if roll < 0.55:
            path = rng.choice(_PATHS).replace("{id}", str(rng.randint(1, 500)))
            status = rng.choices([200, 201, 304, 404, 500], weights=[80, 5, 8, 5, 2])[0]
            ms = round(rng.lognormvariate(3.0, 0.8), 1)
            level = Level.ERROR if status >= 500 else Level.INFO
            yield (
                level,
                "shop.http",
                thread,
                f"{rng.choice(['GET', 'GET', 'GET', 'POST'])} {path} {status} {ms}ms",
                None,
                {"user": user, "status": str(status)},
            )
        elif roll < 0.75:
            ms = round(rng.lognormvariate(1.5, 1.0), 2)
            table = rng.choice(["orders", "items", "users", "sessions"])
            level = Level.WARNING if ms > 40 else Level.DEBUG
            text = f"slow query on {table}: {ms}ms" if ms > 40 else f"SELECT from {table} took {ms}ms"
            yield level, "shop.db", thread, text, None, {"table": table}
        elif roll < 0.88:
            order += 1
            item = rng.choice(_ITEMS)
            amount = f"{rng.randint(3, 120)}.{rng.randint(0, 99):02d}"
            if rng.random() < 0.05:
                yield (
                    Level.ERROR,
                    "shop.payments",
                    thread,
                    f"charge for order {order} failed",
                    _TRACEBACK,
                    {"order": str(order), "amount": amount},
                )
            else:
                yield (
                    Level.INFO,
                    "shop.payments",
                    thread,
                    f"order {order} paid: {item} x{rng.randint(1, 4)}, {amount} EUR",
                    None,
                    {"order": str(order), "user": user},
                )
        elif roll < 0.97:
            yield (
                Level.DEBUG,
                "shop.worker",
                "worker-1",
                f"sent confirmation mail for order {order} to {user}@example.com",
                None,
                {},
            )
        else:
            yield (
                Level.WARNING,
                "shop.scheduler",
                "scheduler",
                f"cache hit ratio dropped to {rng.randint(40, 70)}%; warming up",
                None,
                {},
            )


async def run_demo(agent: Agent, *, rate: float = 3.0, seed: int | None = None) -> None:
    """Log demo records into ``agent`` at about ``rate`` per second, forever."""
    rng = random.Random(seed)
    for level, logger, thread, message, exception, fields in demo_records(rng):
        agent.log(level, message, logger=logger, thread=thread, exception=exception, fields=fields)
        # Exponential gaps give bursts and lulls, like real traffic.
        await trio.sleep(min(rng.expovariate(rate), 5.0))
