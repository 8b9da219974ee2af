"""The official `openai` Python client against a running `lora serve` (a language model): models, completions and
chat completions, each streamed and not, with an adapter as the model. Prints one JSON object with what the client
got, for tests/serve_openai.rs to compare with the server's own answers over plain HTTP; exits non-zero (with the
client's error) when a call fails or the client's streamed and whole answers disagree.

Usage:  python3 scripts/openai_client_check.py --url http://127.0.0.1:8080 --model ADAPTER [--api-key KEY]
Needs:  pip install openai
"""
import argparse
import json
import sys

import openai


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", required=True, help="the model (the base's name or an adapter's)")
    ap.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.url.rstrip("/") + "/v1", api_key=a.api_key, max_retries=0, timeout=120)
    out = {"openai_version": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]

    prompt = "SELECT name FROM"
    c = client.completions.create(model=a.model, prompt=prompt, max_tokens=a.max_tokens, temperature=0)
    out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason,
                         "usage": c.usage.model_dump(exclude_none=True) if c.usage else None}
    pieces = []
    for chunk in client.completions.create(model=a.model, prompt=prompt, max_tokens=a.max_tokens, temperature=0, stream=True):
        pieces.extend(choice.text for choice in chunk.choices)
    out["completion_stream"] = "".join(pieces)

    messages = [{"role": "system", "content": "Answer with Python."}, {"role": "user", "content": "Return the sum of a and b."}]
    r = client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.max_tokens, temperature=0)
    out["chat"] = {"content": r.choices[0].message.content, "role": r.choices[0].message.role,
                   "finish_reason": r.choices[0].finish_reason, "object": r.object, "model": r.model,
                   "usage": r.usage.model_dump(exclude_none=True) if r.usage else None}
    deltas, roles, finishes, usage = [], [], [], None
    stream = client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    out["chat_stream"] = {"content": "".join(deltas), "roles": roles, "finish_reasons": finishes, "usage": usage}

    # Sampling with a seed is reproducible.
    seeded = [client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.max_tokens, temperature=0.9,
                                             top_p=0.95, seed=11).choices[0].message.content for _ in range(2)]
    out["chat_seeded"] = seeded

    # A refused request is the client's typed error with the server's message.
    try:
        client.chat.completions.create(model="no-such-adapter", messages=messages, max_tokens=2)
        out["not_found"] = None
    except openai.NotFoundError as e:
        out["not_found"] = {"status": e.status_code, "message": str(e)}

    problems = []
    if out["completion_stream"] != out["completion"]["text"]:
        problems.append("streamed completion differs from the whole one")
    if out["chat_stream"]["content"] != out["chat"]["content"]:
        problems.append("streamed chat differs from the whole one")
    if seeded[0] != seeded[1]:
        problems.append("the same seed sampled two replies")
    print(json.dumps(out, ensure_ascii=False))
    if problems:
        sys.exit("openai client check: " + "; ".join(problems))


if __name__ == "__main__":
    main()
