"""A scripted OpenAI-compatible upstream on loopback, for the SDK's
tool-calling round trip through sluice: asked with `tools` and no tool
result yet, it streams a call of `get_weather` (arguments in two pieces,
`finish_reason: tool_calls`); once the conversation holds the tool's
result, it streams an answer that quotes it. `GET /v1/models` lists
`fake-model`. Prints `fake openai on 127.0.0.1:PORT`.
"""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chunk(delta, finish=None, usage=None):
    obj = {"id": "fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
           "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = req.get("messages", [])
        tool_result = next((m for m in msgs if m.get("role") == "tool"), None)
        out = [chunk({"role": "assistant", "content": None})]
        if req.get("tools") and tool_result is None:
            out.append(chunk({"tool_calls": [{"index": 0, "id": "call_w1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": ""}}]}))
            out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}))
            out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}))
            out.append(chunk({}, "tool_calls"))
        else:
            said = tool_result["content"] if tool_result else "no tool"
            for word in ["The", " weather", " is", " " + str(said), "."]:
                out.append(chunk({"content": word}))
            out.append(chunk({}, "stop"))
        out.append(chunk(None, usage={"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}))
        out.append(b"data: [DONE]\n\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in out:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(f"fake openai on 127.0.0.1:{srv.server_address[1]}", flush=True)
srv.serve_forever()
