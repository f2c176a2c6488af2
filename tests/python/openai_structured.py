"""Structured outputs, tool calling, logit_bias, n > 1, /tokenize and request
validation, checked with the official `openai` Python client against a live shardline.

Run by the Rust end-to-end test `structured_outputs_and_tools_with_the_openai_client`:
    python3 tests/python/openai_structured.py --base-url http://127.0.0.1:PORT/v1
Exits non-zero with a message on the first failed check.
"""

import argparse
import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, List, Literal

try:
    import openai
    from pydantic import BaseModel, Field
except ImportError:
    sys.exit("the `openai` package is missing: pip install openai (deploy/setup.sh does it)")
if not hasattr(openai.resources.chat.completions.Completions, "parse"):
    sys.exit(f"openai {openai.__version__} lacks chat.completions.parse: pip install 'openai>=1.92'")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


# The schemas: nested objects, arrays, enums, required fields, bounded numbers.
class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    postcode: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    favourite_colour: Colour
    address: Address


class Item(BaseModel):
    name: str = Field(max_length=16)
    quantity: int = Field(ge=1, le=99)
    in_stock: bool


class Inventory(BaseModel):
    items: List[Item] = Field(min_length=1, max_length=3)
    warehouse: Literal["north", "south"]


class Reading(BaseModel):
    temperature: float = Field(ge=-40, le=50)
    unit: Literal["C", "F"]
    station: Annotated[str, Field(max_length=12)]


class Answer(BaseModel):
    verdict: bool
    confidence: int = Field(ge=0, le=100)
    reasons: List[Annotated[str, Field(max_length=30)]] = Field(min_length=1, max_length=2)


CASES = [
    (Person, "Invent a person who lives in Paris. Reply in JSON."),
    (Inventory, "List the stock of a small shop as JSON."),
    (Reading, "Report today's weather reading as JSON."),
    (Answer, "Is the sky blue? Answer as JSON."),
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}


def valid(model_cls, message):
    """The parsed object, checked again against the pydantic model from the raw text."""
    parsed = message.parsed
    assert parsed is not None, f"no parsed object; content {message.content!r}"
    again = model_cls.model_validate_json(message.content)
    assert again == parsed
    return parsed


def structured(client, model):
    for cls, prompt in CASES:
        msgs = [{"role": "user", "content": prompt}]
        r = client.chat.completions.parse(
            model=model, messages=msgs, response_format=cls, max_tokens=400, temperature=0
        )
        check(r.choices[0].finish_reason == "stop", f"{cls.__name__}: finished by the grammar")
        obj = valid(cls, r.choices[0].message)
        check(True, f"{cls.__name__}: parse() returns a valid object {obj.model_dump_json()}")

        with client.chat.completions.stream(
            model=model, messages=msgs, response_format=cls, max_tokens=400, temperature=0
        ) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        streamed = valid(cls, final.choices[0].message)
        check(streamed == obj, f"{cls.__name__}: streamed parse equals the non-streamed one")

        r = client.chat.completions.parse(
            model=model, messages=msgs, response_format=cls, max_tokens=400,
            temperature=0.9, seed=11, n=3,
        )
        check(sorted(c.index for c in r.choices) == [0, 1, 2], f"{cls.__name__}: n=3 indexes")
        for c in r.choices:
            valid(cls, c.message)
        check(True, f"{cls.__name__}: all 3 sampled choices are valid")

    # Under concurrent load: 24 sampled requests over the four schemas at once.
    def one(i):
        cls, prompt = CASES[i % len(CASES)]
        r = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": prompt}], response_format=cls,
            max_tokens=400, temperature=1.0, seed=100 + i,
        )
        return valid(cls, r.choices[0].message)

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, range(24)))
    check(len(results) == 24, "24 concurrent sampled requests: 100 % valid")

    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user",
                   "content": "Reply with a JSON object with the keys name and age for a cat."}],
        response_format={"type": "json_object"}, max_tokens=300, temperature=0,
    )
    check(r.choices[0].finish_reason == "stop", "json_object: finished by the grammar")
    obj = json.loads(r.choices[0].message.content)
    check(isinstance(obj, dict), f"json_object gives a JSON object: {obj}")

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    )
    check(r.choices[0].message.content in ("yes", "no", "maybe"),
          f"structured_outputs.choice: {r.choices[0].message.content!r}")
    r = client.completions.create(
        model=model, prompt="A phone number:", max_tokens=20, temperature=0,
        extra_body={"guided_regex": r"\+44 [0-9]{4} [0-9]{6}"},
    )
    check(re.fullmatch(r"\+44 [0-9]{4} [0-9]{6}", r.choices[0].text) is not None,
          f"guided_regex on completions: {r.choices[0].text!r}")
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick a fruit."}], max_tokens=20,
        extra_body={"guided_grammar": 'start: "I pick " fruit\nfruit: "apple" | "pear"'},
    )
    check(r.choices[0].message.content in ("I pick apple", "I pick pear"),
          f"guided_grammar (Lark): {r.choices[0].message.content!r}")


def tools(client, model):
    tools = [WEATHER, TIME]
    question = [{"role": "user", "content": "What is the weather in Oslo right now?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(
            model=model, messages=question, tools=tools, tool_choice=choice,
            max_tokens=200, temperature=0,
        )
        msg = r.choices[0].message
        check(msg.tool_calls and len(msg.tool_calls) >= 1, f"tool_choice={choice}: a call")
        call = msg.tool_calls[0]
        args = json.loads(call.function.arguments)
        check(call.type == "function" and call.id.startswith("call_"), "call id and type")
        if isinstance(choice, dict):
            check(call.function.name == "get_weather" and len(msg.tool_calls) == 1,
                  "named choice calls exactly that function")
            check(r.choices[0].finish_reason == "stop", "named choice finishes with stop")
        else:
            check(r.choices[0].finish_reason == "tool_calls", "required finishes with tool_calls")
        if call.function.name == "get_weather":
            check(set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"),
                  f"arguments follow the schema: {args}")
        # Round trip: the call and its result go back; the model answers in text.
        follow = question + [msg.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id,
                              "content": json.dumps({"temperature": -3, "sky": "snow"})}]
        # The assistant message dump carries every call; answer each of them.
        for extra in msg.tool_calls[1:]:
            follow.append({"role": "tool", "tool_call_id": extra.id, "content": "{}"})
        final = client.chat.completions.create(
            model=model, messages=follow, tools=tools, tool_choice="none", max_tokens=40,
            temperature=0,
        )
        text = final.choices[0].message.content
        check(isinstance(text, str) and len(text) > 0 and not final.choices[0].message.tool_calls,
              f"round trip with tool_choice={choice}: final answer {text!r}")

    r = client.chat.completions.create(
        model=model, messages=question, tools=tools, tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, temperature=0,
    )
    check(len(r.choices[0].message.tool_calls) == 1, "parallel_tool_calls=false: one call")
    plain = r.choices[0].message.tool_calls[0]

    calls = {}
    for chunk in client.chat.completions.create(
        model=model, messages=question, tools=tools, tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, temperature=0, stream=True,
    ):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "",
                                                   "fragments": 0})
                if d.id:
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
                    entry["fragments"] += 1
    check(list(calls) == [0], f"streamed call indexes {list(calls)}")
    streamed = calls[0]
    check(streamed["fragments"] > 1, f"arguments streamed in {streamed['fragments']} fragments")
    check(streamed["name"] == plain.function.name
          and json.loads(streamed["arguments"]) == json.loads(plain.function.arguments),
          f"streamed deltas reassemble into the same call: {streamed}")

    r = client.chat.completions.create(
        model=model, messages=question, tools=tools, tool_choice="auto", max_tokens=120,
        temperature=0,
    )
    m = r.choices[0].message
    ok = (m.content is not None) or all(json.loads(c.function.arguments) is not None
                                          for c in m.tool_calls or [])
    check(ok, f"tool_choice=auto answers with text or parseable calls: {m}")


def tokens_and_sampling(client, model, root):
    def post(path, body):
        req = urllib.request.Request(root + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    t = post("/tokenize", {"model": model, "prompt": "Hello world", "return_token_strs": True})
    check(t["count"] == len(t["tokens"]) and len(t["token_strs"]) == t["count"]
          and t["max_model_len"] > 0, f"/tokenize: {t}")
    d = post("/detokenize", {"model": model, "tokens": t["tokens"]})
    check(d["prompt"] == "Hello world", "/detokenize inverts /tokenize")
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    check(chat["count"] > 3, "/tokenize renders messages with the chat template")

    # SmolLM2's ChatML template has no tool format: the documented Hermes-style fallback
    # lists the tools in a system message and asks for <tool_call> blocks.
    with_tools = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                    "tools": [WEATHER]})
    rendered = post("/detokenize", {"tokens": with_tools["tokens"]})["prompt"]
    check("system\n# Tools" in rendered and "<tools>" in rendered
          and '"get_weather"' in rendered and "<tool_call>" in rendered,
          f"tools reach SmolLM2 through the fallback prompt: {rendered[:300]!r}")

    word = post("/tokenize", {"prompt": " banana", "add_special_tokens": False})["tokens"][0]
    text = post("/detokenize", {"tokens": [word]})["prompt"]
    for temperature in (0, 1.0):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something."}],
            max_tokens=8, temperature=temperature, seed=3, logit_bias={str(word): 100},
            logprobs=True,
        )
        toks = [c.token for c in r.choices[0].logprobs.content]
        check(len(toks) == 8 and all(tk == text for tk in toks),
              f"logit_bias +100 on {text!r} at temperature {temperature}: every token is it")

    r = client.completions.create(model=model, prompt="Once upon a time", n=3, max_tokens=12,
                                  temperature=0.9, seed=5)
    check(sorted(c.index for c in r.choices) == [0, 1, 2], "n=3 gives indexes 0, 1, 2")
    check(len({c.text for c in r.choices}) > 1, "each choice has its own seed stream")
    again = client.completions.create(model=model, prompt="Once upon a time", n=3,
                                      max_tokens=12, temperature=0.9, seed=5)
    check([c.text for c in again.choices] == [c.text for c in r.choices],
          "n=3 with a seed is reproducible choice by choice")


def bad_inputs(client, model):
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ("logit_bias", dict(messages=user, logit_bias={"99999999": 1})),
        ("logit_bias", dict(messages=user, logit_bias={"5": 150})),
        ("messages[0].role", dict(messages=[{"role": "wizard", "content": "x"}])),
        ("messages[0].content", dict(messages=[{"role": "user"}])),
        ("messages[0].tool_call_id",
         dict(messages=[{"role": "tool", "content": "1", "tool_call_id": "nope"}])),
        ("response_format", dict(messages=user, response_format={
            "type": "json_schema",
            "json_schema": {"name": "bad", "schema": {"type": "object",
                                                      "properties": {"a": {"type": "nope"}}}}})),
        ("guided_regex", dict(messages=user, extra_body={"guided_regex": "(unclosed"})),
        ("tools[0].function.name",
         dict(messages=user, tools=[{"type": "function", "function": {"name": "bad name"}}])),
        ("tool_choice", dict(messages=user, tools=[WEATHER],
                             tool_choice={"type": "function", "function": {"name": "nope"}})),
        ("n", dict(messages=user, n=0)),
        ("audio", dict(messages=user, audio={"voice": "alloy", "format": "wav"})),
        ("reasoning_effort", dict(messages=user, reasoning_effort="high")),
    ]
    for field, kwargs in cases:
        try:
            client.chat.completions.create(model=model, max_tokens=4, **kwargs)
            check(False, f"{field} is rejected")
        except openai.BadRequestError as e:
            param = (e.body or {}).get("param")
            check(param == field, f"bad {field} -> 400 naming it ({e.message})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--skip-schemas", action="store_true", help="skip the schema cases (debugging)")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    model = args.model or client.models.list().data[0].id
    root = args.base_url.rstrip("/").removesuffix("/v1")
    if not args.skip_schemas:
        structured(client, model)
    tools(client, model)
    tokens_and_sampling(client, model, root)
    bad_inputs(client, model)
    print("all structured-output, tool and sampling checks passed")


if __name__ == "__main__":
    main()
