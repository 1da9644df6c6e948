"""CPU work of a request (JSON, chat templates, tokenization) off the event loop, on one small shared pool.

A prompt of several MiB takes seconds to tokenize; on the event loop that would stall every
other request, /health included. Tokenizers and Jinja templates are safe to read from threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

# Few threads: a burst of huge bodies queues here instead of taking every core from the engine.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="strata-cpu")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, partial(fn, *args))
