"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): prompt rendering, grammar, parsing.

A model calls a tool by writing, Hermes/Qwen style,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one block per call). When the model's chat template knows tools (it reads a `tools` variable: Qwen2.5, Hermes,
SmolLM3, ...) the tools and the history (assistant `tool_calls`, `tool` results) are rendered by the template itself.
Otherwise llmkit's generic format is used: a system message lists the tools as JSON schemas and explains the block
above, earlier calls are written back as such blocks, and tool results become user turns wrapped in
<tool_response>...</tool_response>. Either way the output is constrained by a grammar: for `required` or a named
function it must be call blocks whose arguments validate against the function's parameters; for `auto` it is either
free text (not starting with "<") or call blocks. `parallel_tool_calls: false` allows one block.
"""
from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)

GENERIC_SYSTEM = (
    "You can call functions. The available functions, as JSON schemas:\n{tools}\n\n"
    "To call a function, answer with one block per call and nothing else:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n</tool_call>"
)


def template_supports_tools(tok) -> bool:
    """The chat template renders a `tools` variable (then it formats tools and tool messages itself)."""
    return "tools" in (getattr(tok, "chat_template", None) or "")


def _call_text(call: dict) -> str:
    f = call["function"]
    try:
        args = json.loads(f.get("arguments") or "{}")
    except json.JSONDecodeError:
        args = f.get("arguments")
    return f"{OPEN}\n{json.dumps({'name': f['name'], 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def render_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> tuple[list[dict], dict]:
    """OpenAI messages (dicts) -> (messages for the chat template, extra template variables)."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # templates read arguments as objects
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _args(c)}} for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        sys_text = GENERIC_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + sys_text}
        else:
            out.insert(0, {"role": "system", "content": sys_text})
    return out, {}


def _args(call: dict):
    try:
        return json.loads(call["function"].get("arguments") or "{}")
    except json.JSONDecodeError:
        return {}


def call_schema(functions: list[dict]) -> dict:
    """JSON schema of one call {"name", "arguments"} to any of functions."""
    options = []
    for f in functions:
        params = f.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no whitespace to wander into


def tool_lark(tools: list[dict], choice, parallel: bool) -> str:
    """A Lark grammar (llguidance dialect) for the answer under tool_choice."""
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["function"]["name"]]
    schema = json.dumps(call_schema(functions))
    many = "(\"\\n\" call)*" if parallel else ""
    rules = [f"calls: call {many}", f'call: "{OPEN}\\n" %json {schema} "\\n{CLOSE}"']
    if choice == "auto":
        # free text must not start with "<", so an answer is either text or calls
        return "\n".join(["start: calls | TEXT", r"TEXT: /[^<](.|\n)*/"] + rules)
    return "\n".join(["start: calls"] + rules)


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer: blocks that parse become calls; the rest stays content."""
    calls = []
    for m in _BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = _BLOCK.sub("", text).strip()
    return (rest or None), calls


class CallStream:
    """Turns streamed text into OpenAI chat deltas: content while it cannot be a call, tool_calls deltas per call.

    A call is sent as two deltas, as OpenAI does: {index, id, type, function: {name, arguments: ""}}, then
    {index, function: {arguments}}.
    """

    def __init__(self):
        self.buf, self.mode, self.n = "", "undecided", 0  # undecided | text | calls

    def push(self, piece: str) -> list[dict]:
        """Deltas ready after this piece."""
        self.buf += piece
        if self.mode == "undecided":
            head = self.buf.lstrip()
            if not head:
                return []
            if OPEN.startswith(head[: len(OPEN)]) and (len(head) < len(OPEN) or head.startswith(OPEN)):
                self.mode = "calls" if head.startswith(OPEN) else "undecided"
                if self.mode == "undecided":
                    return []
            else:
                self.mode = "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return [{"content": out}]
        return self._calls()

    def _calls(self) -> list[dict]:
        deltas = []
        while True:
            m = _BLOCK.search(self.buf)
            if not m:
                return deltas
            _, calls = parse_calls(m.group(0))
            self.buf = self.buf[m.end():]
            for c in calls:
                i = self.n
                self.n += 1
                deltas.append({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                               "function": {"name": c["function"]["name"], "arguments": ""}}]})
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})

    def finish(self) -> list[dict]:
        """Whatever is left when the answer ends (an unfinished call block is returned as text)."""
        rest, self.buf = self.buf, ""
        if self.mode == "calls":
            rest = rest.strip()
        return [{"content": rest}] if rest else []
