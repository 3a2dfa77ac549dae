#!/usr/bin/env python3
"""Writes cases.json: each chat template of this folder rendered by Python's Jinja2 the way
transformers' apply_chat_template renders (trim_blocks, lstrip_blocks, loop controls,
raise_exception, tojson without ASCII escaping). test_chat.cpp renders the same cases with
Multipole's renderer and compares. Run: python3 make_expected.py (needs python3-jinja2)."""
import json, os, jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

here = os.path.dirname(os.path.abspath(__file__))

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception

conversations = {
    "one_turn": [{"role": "user", "content": "Hello there!"}],
    "system_and_turns": [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What is FMA?"},
        {"role": "assistant", "content": " Fast multipole attention. "},
        {"role": "user", "content": "And its cache?\nIn bytes, please."},
    ],
    "three_turns": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c \u00e9\u4e2d"},
    ],
    "not_alternating": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}
# Keys sorted: the engine's JSON objects iterate in key order (docs/CHAT.md).
tools = [{"function": {"description": "Weather now", "name": "get_weather",
                        "parameters": {"properties": {"city": {"type": "string"}}, "type": "object"}},
          "type": "function"}]

cases = []
for name in sorted(os.listdir(here)):
    if not name.endswith(".jinja"):
        continue
    source = open(os.path.join(here, name), encoding="utf-8").read()
    for conv, messages in conversations.items():
        for gen in (True, False):
            ctx = {"messages": messages, "add_generation_prompt": gen, "bos_token": "<s>",
                   "eos_token": "</s>"}
            if name.startswith("llama31"):
                ctx["tools"] = tools if conv == "three_turns" else None
            case = {"template": name, "conversation": conv, "context": ctx}
            try:
                case["expected"] = env.from_string(source).render(**ctx)
            except jinja2.exceptions.TemplateError as e:
                case["expected_error"] = str(e)
            cases.append(case)
with open(os.path.join(here, "cases.json"), "w", encoding="utf-8") as f:
    json.dump(cases, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(len(cases), "cases")
