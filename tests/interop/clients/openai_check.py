"""The official openai Python SDK against sluice's OpenAI-compatible API.

    python openai_check.py --addr HOST:PORT --deadline-addr HOST:PORT --nostream-addr HOST:PORT

--addr: a default sluice; --deadline-addr: one started with
`--max-stream-ms 300 --sim-itl-ms 50`; --nostream-addr: one with `--no-streaming`.
"""

import argparse
import json

import openai
from openai import OpenAI

from common import Checks, http_post_json, metric, native_text, sse

ap = argparse.ArgumentParser()
ap.add_argument("--addr", required=True)
ap.add_argument("--deadline-addr", required=True)
ap.add_argument("--nostream-addr", required=True)
ap.add_argument("--tools-addr", help="a sluice in front of fake_openai.py")
args = ap.parse_args()

c = Checks("openai")
print(f"openai SDK {openai.__version__}", flush=True)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the interop suite"},
]
MAX = 24


def client(addr, **kw):
    return OpenAI(base_url=f"http://{addr}/v1", api_key="x", max_retries=0, timeout=20, **kw)


native, native_done, native_n = native_text(args.addr, {"messages": MESSAGES, "max_tokens": MAX})
print(f"native text ({native_n} tokens): {native!r}", flush=True)


def streaming():
    chunks = list(
        client(args.addr).chat.completions.create(
            model="sluice-sim",
            messages=MESSAGES,
            max_tokens=MAX,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    text = "".join(content)
    c.check("stream: content deltas equal the native stream's text", text == native, f"{len(content)} deltas, {text!r}")
    c.check(
        "stream: first chunk carries role=assistant",
        bool(chunks) and bool(chunks[0].choices) and chunks[0].choices[0].delta.role == "assistant",
    )
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    c.check("stream: a chunk with finish_reason=length", reasons == ["length"], f"{reasons}")
    usage = [ch for ch in chunks if ch.usage is not None]
    last = chunks[-1] if chunks else None
    ok = (
        len(usage) == 1
        and last is usage[0]
        and last.choices == []
        and last.usage.completion_tokens == MAX
        and last.usage.prompt_tokens == native_done["usage"]["prompt_tokens"]
        and last.usage.total_tokens == MAX + native_done["usage"]["prompt_tokens"]
    )
    c.check("stream: usage chunk (choices=[]) arrives last with the right counts", ok, f"{usage[0].usage if usage else None}")
    c.check("stream: chunk ids and model consistent", len({ch.id for ch in chunks}) == 1 and all(ch.model == "sluice-sim" for ch in chunks),
            f"id {chunks[0].id if chunks else None}")


def non_streaming():
    r = client(args.addr).chat.completions.create(model="sluice-sim", messages=MESSAGES, max_tokens=MAX)
    text = r.choices[0].message.content
    c.check("create(): same text as the native stream", text == native, f"{text!r}")
    c.check(
        "create(): usage and finish_reason",
        r.usage.completion_tokens == MAX
        and r.usage.prompt_tokens == native_done["usage"]["prompt_tokens"]
        and r.choices[0].finish_reason == "length"
        and r.object == "chat.completion"
        and r.choices[0].message.role == "assistant",
        f"usage={r.usage}, finish={r.choices[0].finish_reason}",
    )


def bad_requests():
    cl = client(args.addr)
    for label, kw in [
        ("max_tokens=0", {"messages": MESSAGES, "max_tokens": 0}),
        ("messages=[]", {"messages": []}),
        ("n=2", {"messages": MESSAGES, "n": 2}),
    ]:
        try:
            cl.chat.completions.create(model="sluice-sim", **kw)
            c.check(f"bad request {label} raises BadRequestError", False, "no exception")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            c.check(
                f"bad request {label} raises BadRequestError",
                e.status_code == 400 and body.get("type") == "invalid_request_error",
                f"{e.status_code}: {body.get('message')}",
            )
        except Exception as e:  # noqa: BLE001
            c.check(f"bad request {label} raises BadRequestError", False, f"{type(e).__name__}: {e}")


def mid_stream_failure():
    addr = args.deadline_addr
    # The raw stream first: content chunks, then `data: {"error": ...}`, no [DONE].
    status, _, events, _ = sse(addr, "POST", "/v1/chat/completions",
                               {"messages": MESSAGES, "max_tokens": 64, "stream": True})
    datas = [e.data for e in events if e.data is not None]
    last = json.loads(datas[-1]) if datas and datas[-1] != "[DONE]" else None
    c.check(
        "raw: mid-stream failure is a final data: {error} with no [DONE]",
        status == 200 and "[DONE]" not in datas and isinstance(last, dict) and last.get("error", {}).get("code") == "deadline_exceeded",
        f"{len(datas) - 1} chunks, then {datas[-1] if datas else None}",
    )
    errored0 = metric(addr, 'sluice_streams_errored_total{code="deadline_exceeded"}')
    got, exc = [], None
    try:
        stream = client(addr).chat.completions.create(
            model="sluice-sim", messages=MESSAGES, max_tokens=64, stream=True
        )
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    except Exception as e:  # noqa: BLE001
        exc = e
    c.check(
        "SDK: mid-stream failure raises openai.APIError while iterating",
        isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIConnectionError) and len(got) > 0,
        f"{type(exc).__name__ if exc else 'no exception'} after {len(got)} deltas: {exc}; body={getattr(exc, 'body', None)}",
    )
    c.check("SDK: the deltas before the failure are the start of the same text",
            bool(got) and native.startswith("".join(got)), f"{''.join(got)!r}")
    errored1 = metric(addr, 'sluice_streams_errored_total{code="deadline_exceeded"}')
    c.check("server counted the deadline_exceeded", errored1 == errored0 + 1, f"{errored0} -> {errored1}")


def models():
    ms = client(args.addr).models.list()
    ids = [m.id for m in ms.data]
    c.check("models.list() lists sluice-sim", "sluice-sim" in ids, f"{ids}")


def no_streaming():
    addr = args.nostream_addr
    chunks = list(
        client(addr).chat.completions.create(
            model="sluice-sim", messages=MESSAGES, max_tokens=MAX, stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    c.check(
        "--no-streaming: stream=True yields the whole text in one delta",
        len(content) == 1 and content[0] == native,
        f"{len(content)} content deltas, {len(chunks)} chunks",
    )
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    c.check("--no-streaming: stream=True still sends the usage chunk",
            len(usage) == 1 and usage[0].completion_tokens == MAX, f"{usage}")
    # The native endpoint under --no-streaming: one JSON document, same text.
    status, hdrs, doc = http_post_json(addr, "/v1/chat/stream", {"messages": MESSAGES, "max_tokens": MAX})
    c.check(
        "--no-streaming: native endpoint answers one JSON document with the same text",
        status == 200 and hdrs.get("Content-Type", "").startswith("application/json")
        and doc.get("text") == native and doc.get("usage", {}).get("completion_tokens") == MAX,
        f"{hdrs.get('Content-Type')}, finish_reason={doc.get('finish_reason')}",
    )
    r = client(addr).chat.completions.create(model="sluice-sim", messages=MESSAGES, max_tokens=MAX)
    c.check("--no-streaming: create() gives the same text", r.choices[0].message.content == native)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_round_trip(stream):
    """The SDK's whole tool loop through sluice: the model calls a tool,
    the caller runs it and sends the result back, the model answers."""
    cl = client(args.tools_addr)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        calls, finish = {}, None
        for ch in cl.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS, stream=True):
            if not ch.choices:
                continue
            ch0 = ch.choices[0]
            for tc in ch0.delta.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                if tc.function and tc.function.name:
                    acc["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    acc["arguments"] += tc.function.arguments
            finish = ch0.finish_reason or finish
        call = calls.get(0, {})
    else:
        r = cl.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS)
        finish = r.choices[0].finish_reason
        tc = (r.choices[0].message.tool_calls or [None])[0]
        call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments} if tc else {}
    args_ok = call.get("arguments") and json.loads(call["arguments"]) == {"city": "Paris"}
    c.check(f"tools ({'stream' if stream else 'create'}): the model's call arrives whole",
            finish == "tool_calls" and call.get("id") == "call_w1" and call.get("name") == "get_weather" and args_ok,
            f"finish={finish}, call={call}")
    msgs.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call.get("id"), "type": "function", "function": {"name": call.get("name"), "arguments": call.get("arguments")}}]})
    msgs.append({"role": "tool", "tool_call_id": call.get("id"), "content": "sunny"})
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       cl.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS, stream=True)
                       if ch.choices)
    else:
        text = cl.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS).choices[0].message.content
    c.check(f"tools ({'stream' if stream else 'create'}): the tool's result went upstream and the answer uses it",
            text == "The weather is sunny.", repr(text))


def retrieve():
    m = client(args.addr).models.retrieve("sluice-sim")
    c.check("models.retrieve: the served model", m.id == "sluice-sim", repr(m))
    try:
        client(args.addr).models.retrieve("no-such-model")
        c.check("models.retrieve: an unknown model is NotFoundError", False, "no error")
    except openai.NotFoundError as e:
        c.check("models.retrieve: an unknown model is NotFoundError", e.status_code == 404, str(e))


c.scenario("streaming chat completion", streaming)
c.scenario("non-streaming chat completion", non_streaming)
c.scenario("bad requests", bad_requests)
c.scenario("mid-stream failure", mid_stream_failure)
c.scenario("models.list", models)
c.scenario("--no-streaming", no_streaming)
c.scenario("models.retrieve", retrieve)
if args.tools_addr:
    c.scenario("tool calling, streamed", lambda: tool_round_trip(True))
    c.scenario("tool calling, not streamed", lambda: tool_round_trip(False))
c.finish()
