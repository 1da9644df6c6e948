"""Tool calling, output side: the calls in what the model wrote, whole (a response) or as it comes (a stream).

Formats: named calls are the arguments alone; required calls a JSON array of {"name", "arguments"} (both
written under a grammar, so they always parse); auto reads what the model chose to write, in the format of
its parser: Hermes `<tool_call>{...}</tool_call>` blocks (also strata's generic format), Llama 3 JSON
(`{"name", "parameters"}`, several separated by ";") or Mistral's `[TOOL_CALLS][...]`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from strata.server.tools import ToolPlan

_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _value_end(text: str, start: int) -> int | None:
    """The end of the JSON value that starts at text[start], or None if the text ends inside it."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",\n ":
            return i
    return None


def required_calls(text: str) -> list[tuple[str, str, bool]]:
    """The calls of a required-mode array so far: (name, arguments text, arguments complete)."""
    calls: list[tuple[str, str, bool]] = []
    pos = text.find("[")
    if pos < 0:
        return calls
    pos += 1
    while True:
        head = _CALL_HEAD.match(text, pos)
        if head is None:
            return calls
        name, start = json.loads(f'"{head.group(1)}"'), head.end()
        end = _value_end(text, start)
        if end is None:
            calls.append((name, text[start:], False))
            return calls
        calls.append((name, text[start:end], True))
        close = text.find("}", end)
        if close < 0:
            return calls
        pos = close + 1
        while pos < len(text) and text[pos] in " \n\t,":
            pos += 1


def _call(obj: Any) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _hermes(text: str) -> tuple[str | None, list[ParsedCall]]:
    calls, kept, last = [], [], 0
    for m in _HERMES_BLOCK.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except ValueError:
            call = None
        if call is None:
            continue  # not a call after all: it stays in the content
        calls.append(call)
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[ParsedCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls = []
    for part in body.split(";"):
        try:
            call = _call(json.loads(part))
        except ValueError:
            call = None
        if call is None:
            return text or None, []
        calls.append(call)
    return None, calls


def _mistral(text: str) -> tuple[str | None, list[ParsedCall]]:
    if "[TOOL_CALLS]" not in text:
        return text or None, []
    before, after = text.split("[TOOL_CALLS]", 1)
    try:
        items = json.loads(after.strip())
    except ValueError:
        return text or None, []
    calls = [c for c in (_call(x) for x in (items if isinstance(items, list) else [items])) if c is not None]
    return (before.strip() or None), calls


def parse_tool_output(plan: ToolPlan, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    if plan.mode == "named":
        assert plan.named is not None
        return None, [ParsedCall(plan.named, text)]
    if plan.mode == "required":
        return None, [ParsedCall(n, a) for n, a, _ in required_calls(text)]
    content, calls = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}[plan.parser](text)
    if calls and not plan.parallel:
        calls = calls[:1]
    return (content if calls else (text or None)), calls


def _header(index: int, call_id: str, name: str, arguments: str = "") -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def _arguments(index: int, piece: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


class ToolCallStream:
    """Turns one choice's text deltas into OpenAI chat deltas: content, and tool calls (id and name first,
    then the arguments; in pieces as they are written for named and required calls)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.num_calls = 0
        self._ids: list[str] = []
        self._sent: list[int] = []  # per call: characters of its arguments sent
        self._content_sent = 0  # auto, hermes: characters of the text handled (sent or parsed)

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self.plan.mode == "named":
            return self._named(delta)
        if self.plan.mode == "required":
            return self._required()
        if self.plan.parser == "hermes":
            return self._hermes(final=False)
        return self._whole_output(final=False)

    def finish(self) -> list[dict[str, Any]]:
        if self.plan.mode in ("named", "required"):
            return []
        if self.plan.parser == "hermes":
            return self._hermes(final=True)
        return self._whole_output(final=True)

    def _named(self, delta: str) -> list[dict[str, Any]]:
        assert self.plan.named is not None
        out = []
        if not self.num_calls:
            self.num_calls = 1
            out.append(_header(0, new_call_id(), self.plan.named))
        if delta:
            out.append(_arguments(0, delta))
        return out

    def _required(self) -> list[dict[str, Any]]:
        out = []
        for i, (name, args, _) in enumerate(required_calls(self.text)):
            if i >= self.num_calls:
                self.num_calls += 1
                self._sent.append(0)
                out.append(_header(i, new_call_id(), name))
            if len(args) > self._sent[i]:
                out.append(_arguments(i, args[self._sent[i]:]))
                self._sent[i] = len(args)
        return out

    def _emit_call(self, call: ParsedCall) -> list[dict[str, Any]]:
        if self.num_calls and not self.plan.parallel:
            return []
        self.num_calls += 1
        return [_header(self.num_calls - 1, new_call_id(), call.name, call.arguments)]

    def _hermes(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            rest = self.text[self._content_sent:]
            start = rest.find(OPEN_TAG)
            if start < 0:
                # Hold back what could be the start of a tag.
                keep = 0 if final else next((k for k in range(len(OPEN_TAG) - 1, 0, -1)
                                             if rest.endswith(OPEN_TAG[:k])), 0)
                piece = rest[:len(rest) - keep]
                if piece:
                    out.append({"content": piece})
                    self._content_sent += len(piece)
                return out
            if start:
                out.append({"content": rest[:start]})
                self._content_sent += start
                continue
            end = rest.find(CLOSE_TAG)
            if end < 0 and not final:
                return out  # inside a block: wait for its end
            block = rest if end < 0 else rest[:end + len(CLOSE_TAG)]
            _, calls = _hermes(block)
            if calls:
                out += self._emit_call(calls[0])
            else:
                out.append({"content": block})
            self._content_sent += len(block)
            if end < 0:
                return out

    def _whole_output(self, final: bool) -> list[dict[str, Any]]:
        # Llama 3 JSON and Mistral calls are read from the whole output; plain text streams as it comes.
        if not self._content_sent:
            head = self.text.lstrip()
            markers = ("<|python_tag|>", "[TOOL_CALLS]")
            if not head or head[0] in "{[" or any(head.startswith(m) or m.startswith(head) for m in markers):
                if not final:
                    return []
                self._content_sent = len(self.text)
                content, calls = parse_tool_output(self.plan, self.text)
                out: list[dict[str, Any]] = [{"content": content}] if content else []
                for call in calls:
                    out += self._emit_call(call)
                return out
        piece = self.text[self._content_sent:]
        self._content_sent = len(self.text)
        return [{"content": piece}] if piece else []
