"""A slow tier stalls only the session that reads from it: with every SSD chunk read taking 2 s
(STRATA_INJECT_FAULT ssd-read-ms=2000), a session whose history is on SSD waits for it off the engine
thread while another request's decode steps go on at their usual pace; then it is served from SSD with the
answer a recomputation gives."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import ServerProcess, started

pytestmark = pytest.mark.slow

HISTORY = [{"role": "user", "content": "Tell me about the moon."}]


def _client(srv: ServerProcess) -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_times(client: OpenAI, max_tokens: int, started_at: list[float]) -> list[float]:
    """Arrival times of a long greedy stream's tokens (no session: nothing to load)."""
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, stream=True, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    times = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.monotonic())
            if len(times) == 1:
                started_at.append(times[0])
    return times


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False) if start <= a and b <= end]


def test_slow_ssd_reads_stall_only_their_own_session(tmp_path: Path):
    ssd = str(tmp_path / "ssd")
    args = ("--kv-cache-gb", "0.1", "--ssd-dir", ssd, "--max-num-seqs", "4")
    first = ServerProcess(*args, log=tmp_path / "first.log")
    with started({"first": first}):
        client = _client(first)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=HISTORY,
                                               max_tokens=24, temperature=0, extra_headers={"X-Session-ID": "slow"})
        history = HISTORY + [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": "How far away is it?"}]
    # Stopped (its tiers written back) and started again: the session's history is on SSD only.
    procs = {"slow": ServerProcess(*args, log=tmp_path / "slow.log", env={"STRATA_INJECT_FAULT": "ssd-read-ms=2000"}),
             "off": ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", log=tmp_path / "off.log")}
    with started(procs):
        client = _client(procs["slow"])
        undisturbed = _stream_times(client, 96, [])

        neighbour_start: list[float] = []
        neighbour: list[float] = []
        runner = threading.Thread(target=lambda: neighbour.extend(_stream_times(client, 160, neighbour_start)))
        runner.start()
        while not neighbour_start:
            time.sleep(0.01)
        time.sleep(0.5)  # the neighbour is decoding
        sent = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(
            model=client.models.list().data[0].id, messages=history, max_tokens=24, temperature=0,
            extra_headers={"X-Session-ID": "slow"})
        waited = time.monotonic() - sent
        runner.join()

        reply = raw.parse()
        assert waited >= 2.0, f"the session did not wait for its slow read ({waited:.2f} s)"
        assert raw.headers["x-cache-tier"] == "ssd" and reply.usage.prompt_tokens_details.cached_tokens > 0
        off = _client(procs["off"])
        assert reply.choices[0].message.content == off.chat.completions.create(
            model=off.models.list().data[0].id, messages=history, max_tokens=24,
            temperature=0).choices[0].message.content

        # While the session waited for its read (the 2 s after it was sent), the neighbour kept decoding.
        during = _gaps(neighbour, sent, sent + 1.9)
        usual = statistics.median(_gaps(undisturbed, 0, float("inf")))
        assert len(during) >= 5, f"the neighbour stalled: {len(during)} tokens in the slow read's 2 s"
        assert statistics.median(during) <= 2 * usual, (statistics.median(during), usual)
        assert max(during) < 1.5, f"a {max(during):.2f} s gap: the engine waited on the slow read"
        # The read was done before the session was scheduled: its load came from memory, nothing stalled on SSD.
        assert procs["slow"].metric('strata_kv_load_stall_seconds_total{tier="ssd"}') < 0.5
