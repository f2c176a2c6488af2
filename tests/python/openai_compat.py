"""OpenAI API compatibility, checked with the official `openai` Python client.

Run by the Rust end-to-end test `e2e_openai` against a live `shardline up`:
    python3 tests/python/openai_compat.py --base-url http://127.0.0.1:PORT/v1
Exits non-zero with a message on the first failed check.
"""

import argparse
import sys

try:
    import openai
except ImportError:
    sys.exit("the `openai` package is missing: pip install openai (deploy/setup.sh does it)")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) >= 1, f"/v1/models lists the served model {ids}")
    model = args.model or ids[0]

    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three colours."},
    ]

    # Chat, non-streaming vs streaming, same seed -> same text.
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0.8, seed=7
    )
    text = chat.choices[0].message.content
    check(isinstance(text, str) and len(text) > 0, "chat completion returns text")
    check(chat.usage.completion_tokens > 0, "chat usage counts completion tokens")
    check(chat.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0.8,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta and c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(parts) == text, "streamed chat text equals non-streamed text (same seed)")
    check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens,
          "stream_options.include_usage reports the same usage")
    check(finish == chat.choices[0].finish_reason, "streamed finish_reason matches")

    # Completions with stop strings: the stop string is not in the output.
    prompt = "1, 2, 3, 4, 5, 6,"
    comp = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    full = comp.choices[0].text
    check(len(full) > 0, f"greedy completion: {full!r}")
    if len(full.strip()) > 3:
        stop = full.strip()[2:4]
        stopped = client.completions.create(
            model=model, prompt=prompt, max_tokens=32, temperature=0, stop=[stop]
        )
        t = stopped.choices[0].text
        check(stop not in t and full.startswith(t), f"stop string {stop!r} cuts the text: {t!r}")
        check(stopped.choices[0].finish_reason == "stop", "finish_reason is stop after a stop string")

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=32, temperature=0, stream=True
        )
        if c.choices
    )
    check(streamed == full, "streamed completion equals non-streamed (greedy)")

    # Logprobs: chat (top_logprobs) and completions (echo with max_tokens 0).
    lp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, logprobs=True, top_logprobs=3, seed=1
    )
    content = lp.choices[0].logprobs.content
    check(len(content) == lp.usage.completion_tokens, "one logprob entry per chat token")
    check(all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in content), "chat top_logprobs")

    echo = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=0, echo=True, logprobs=1
    )
    ch = echo.choices[0]
    check(ch.text == "The capital of France is", "echo returns the prompt")
    toks = ch.logprobs.token_logprobs
    check(len(toks) == echo.usage.prompt_tokens and toks[0] is None
          and all(x is not None and x <= 0 for x in toks[1:]),
          "echo + logprobs scores every prompt token (first is None)")

    # Errors come back as OpenAI errors.
    try:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
        check(False, "unknown model is rejected")
    except openai.NotFoundError as e:
        check("model" in str(e), "unknown model -> 404 naming the model")
    except openai.BadRequestError as e:
        check("model" in str(e), "unknown model -> 400 naming the model")
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=-1)
        check(False, "negative temperature is rejected")
    except openai.BadRequestError as e:
        check("temperature" in str(e), "negative temperature -> 400 naming the field")

    print("all openai-client checks passed")


if __name__ == "__main__":
    main()
