"""Tool calling, request side: which tools a chat request offers, how the prompt shows them and a history's
calls, and the grammar that makes a required or named call always parse and match its schema.

The output side (reading calls back out of the text, whole or streamed) is tool_calls.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from strata.engine.grammar import GrammarSpec
from strata.server.errors import bad_request
from strata.server.protocol import ChatCompletionRequest, ChatMessage, ToolDef

GENERIC_TOOLS_PROMPT = """# Tools

You can call functions to answer. Each function is described below as JSON, inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write one block per call, holding a JSON object with its name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""


@dataclass
class ToolPlan:
    """What a request allows: its tools, and whether the model may (auto), must (required) or must call
    one named function (named)."""

    tools: list[ToolDef]
    mode: str  # "auto", "required" or "named"
    named: str | None  # the function tool_choice names
    parallel: bool
    parser: str

    def schema(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t.function.name == name:
                return t.function.parameters or {"type": "object", "properties": {}}
        raise KeyError(name)


def pick_parser(template_source: str, configured: str | None) -> str:
    """--tool-call-parser when given, else the format the chat template shows, else the generic one."""
    if configured:
        return configured
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return "llama3_json"
    return "hermes"


def tool_plan(body: ChatCompletionRequest, template_source: str, configured_parser: str | None
              ) -> ToolPlan | None:
    """None when the request offers no tools or tool_choice is "none" (then it is a plain chat)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs `tools`", param="tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", param="tools")
    if choice == "none":
        return None
    named = None
    if not isinstance(choice, str) and choice is not None:
        named = choice.function.name
        if named not in names:
            raise bad_request(f"tool_choice names {named!r}, which is not in `tools`", param="tool_choice")
    mode = "named" if named else (choice or "auto")
    return ToolPlan(list(body.tools), mode, named, body.parallel_tool_calls,
                    pick_parser(template_source, configured_parser))


def tool_grammar(plan: ToolPlan) -> tuple[GrammarSpec, str] | None:
    """named: the output is the function's arguments; required: a JSON array of calls (one unless parallel
    calls are allowed), each {"name", "arguments"} matching its function's schema. auto: unconstrained."""
    if plan.mode == "named":
        assert plan.named is not None
        index = [t.function.name for t in plan.tools].index(plan.named)
        strict = bool(plan.tools[index].function.strict)
        return (GrammarSpec("json_schema", json.dumps(plan.schema(plan.named)), strict=strict),
                f"tools[{index}].function.parameters")
    if plan.mode == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "arguments": plan.schema(t.function.name)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in plan.tools]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not plan.parallel:
            array["maxItems"] = 1
        return GrammarSpec("json_schema", json.dumps(array), strict=False), "tools"
    return None


def _tool_json(t: ToolDef) -> dict[str, Any]:
    return {"type": "function", "function": t.function.model_dump(exclude_none=True)}


def _arguments(text: str) -> Any:
    # Templates that take tools expect the arguments as an object (HF's convention); clients send JSON text.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _generic_call_text(message: ChatMessage) -> str:
    blocks = [f'<tool_call>\n{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}'
              "\n</tool_call>" for c in message.tool_calls or []]
    return "\n".join(([message.text()] if message.text() else []) + blocks)


def template_messages(messages: list[ChatMessage], plan: ToolPlan | None, takes_tools: bool
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools) the chat template renders.

    A template that takes tools gets them, the assistants' tool_calls and the tool messages as Hugging Face
    templates expect. Any other template gets plain text: the tools described in the system message, calls
    as <tool_call> blocks in the assistant's text and results as <tool_response> blocks in a user turn.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if takes_tools:
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
        elif m.role == "assistant" and m.tool_calls:
            d["content"] = _generic_call_text(m)
        elif m.role == "tool":
            d = {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
        out.append(d)
    if plan is None:
        return out, None
    tools = [_tool_json(t) for t in plan.tools]
    if takes_tools:
        return out, tools
    prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = out[0] | {"content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None
