"""
Serve a trained model over HTTP: OpenAI's completions and chat completions APIs (any OpenAI
client works unchanged) and a playground page with streaming text, a chat, and attention maps.

$ python serve.py --out_dir=out-shakespeare-char-cpu          # http://127.0.0.1:8000
$ python serve.py --init_from=gpt2 --quantize=int8 --port=8080
$ curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8}'
$ python serve.py --out_dir=out-chat-reverse                  # a run fine-tuned for chat (docs/chat.md)
$ curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "reverse: wodnik"}], "temperature": 0}'

Endpoints: POST /v1/completions (prompt, max_tokens, temperature, top_p, seed, stop, n, stream,
echo; top_k as an extension), POST /v1/chat/completions (messages instead of prompt and echo;
runs fine-tuned for chat only: the reply ends at <|end|>), GET /v1/models (its "chat" says which),
GET /health, GET / (the playground) and POST /v1/attention (the playground's heatmaps). Requests
running at the same time are decoded together, one batch on the KV cache, joining and leaving
between steps (Engine). A bad request gets an HTTP error with OpenAI's {"error": {...}} body and
one log line; the server goes on. Knobs are --key=value flags or config files, checked like
train.py's.
"""

import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

import torch

from lib import loading, runs
from lib.plotting import attention_maps
from lib.quantize import QUANTIZE, quantize_model
from lib.serving import (Engine, RequestError, encode, read_chat_request, read_request,
                         start_chat_generations, start_generations)

# -----------------------------------------------------------------------------
# defaults; config files and --key=value flags change them
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or an HF folder
out_dir = 'out'  # the training run's folder (init_from='resume'); without it, the newest run here
data_dir = ''  # folder with the tokenizer metadata; '' = the checkpoint's dataset (or the tokenizer it keeps)
host = '127.0.0.1'  # address to listen on; 0.0.0.0 serves other machines too (no authentication!)
port = 8000  # TCP port; 0 picks a free one (printed)
max_batch = 16  # sequences decoded together at most; more requests wait their turn
max_tokens_limit = 0  # largest max_tokens a request may ask for; 0 = the model's block_size - 1
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
quantize = 'none'  # 'none' or 'int8' (int8 weights: ~2x faster CPU decoding)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
RULES = dict(port='0..65535', max_batch='>= 1', max_tokens_limit='>= 0', quantize=QUANTIZE)
ROUTES = {'/': 'GET', '/health': 'GET', '/v1/models': 'GET', '/v1/completions': 'POST',
          '/v1/chat/completions': 'POST', '/v1/attention': 'POST'}
MAX_BODY = 1 << 20  # a request body's largest size in bytes


# -----------------------------------------------------------------------------
# HTTP

class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection thread never keeps the process alive at shutdown
    request_queue_size = 128  # the listen backlog: at the default 5, a 16-client burst lost connections for a 1 s SYN retry

    def __init__(self, address, engine, name, max_tokens):
        super().__init__(address, Handler)
        self.engine, self.name, self.tokenizer = engine, name, engine.tokenizer
        self.block_size, self.max_batch = engine.model.config.block_size, engine.max_batch
        self.max_tokens = max_tokens
        self.chat = bool(self.tokenizer.special_ids)  # fine-tuned for chat (lib/chat.py)


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'gpt-serve/1'

    problem = ''  # a failed request's message, for its log line

    def log_message(self, fmt, *args):  # one line per request on stderr
        print(f"{self.address_string()} {fmt % args}{self.problem}", file=sys.stderr, flush=True)
        self.problem = ''

    def fail(self, error):
        self.problem = f": {error.message}"  # the access line says what was wrong
        self.send_json(error.status, error.body(), error.headers)

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:  # the client learns it before it sends the next request
            self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        """The request's body, read off the connection whatever the method and path, so the next
        request on a kept-alive connection is parsed from its own first byte. A body that is not
        read whole (chunked, a length that is no number or above 1 MiB) gets an error and ends
        the connection, since where the next request starts is then unknown."""
        length = self.headers.get('Content-Length')
        if self.headers.get('Transfer-Encoding'):
            self.close_connection = True
            raise RequestError("send the body with a Content-Length header (chunked bodies are not "
                               "supported)", status=411)
        if length is None:
            return b''  # HTTP/1.1: no Content-Length and no Transfer-Encoding, no body
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(f"Content-Length must be a whole number of bytes, got {length!r}")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise RequestError("the body is larger than 1 MiB", status=413)
        return self.rfile.read(int(length))

    def do_GET(self):
        self.answer('GET')

    def do_POST(self):
        self.answer('POST')

    def answer(self, method):
        try:
            body = self.read_body()  # first: an error below must not leave it on the connection
            path = urlsplit(self.path).path
            if ROUTES.get(path) != method:
                if path in ROUTES:
                    raise RequestError(f"{path} takes {ROUTES[path]}, not {method}", status=405,
                                       headers={'Allow': ROUTES[path]})
                raise RequestError(f"no such endpoint: {method} {path}", status=404)
            if path == '/':
                self.playground()
            elif path == '/health':
                engine = self.server.engine
                self.send_json(200, {'status': 'ok', 'running': len(engine.rows), 'waiting': engine.pending.qsize(),
                                     'finished': dict(engine.finished), 'tokens_generated': engine.generated})
            elif path == '/v1/models':
                self.send_json(200, {'object': 'list', 'data': [{'id': self.server.name, 'object': 'model',
                                                                  'created': 0, 'owned_by': 'you',
                                                                  'chat': self.server.chat}]})
            elif path == '/v1/completions':
                self.complete(read_request(body, self.server))
            elif path == '/v1/chat/completions':
                self.chat(read_chat_request(body, self.server))
            else:
                self.attention(body)
        except RequestError as e:
            self.fail(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generations were cancelled below
        except Exception as e:  # never take the server down
            self.fail(RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind='server_error'))

    def playground(self):
        page = (Path(__file__).resolve().parent / 'lib' / 'playground.html').read_bytes()
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def complete(self, p):
        server = self.server
        generations, used, dropped = start_generations(p, server.tokenizer, server.engine)
        head = dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object='text_completion', created=int(time.time()),
                    model=server.name)
        echo = [server.tokenizer.decode(g.prompt) if p['echo'] else '' for g in generations]

        def choice(g, piece):  # piece None: the choice's end
            return dict(text=piece or '', index=g.index, logprobs=None,
                        finish_reason=None if piece is not None else g.finish_reason)
        try:
            if p['stream']:
                first = [dict(choice(g, e), finish_reason=None) for g, e in zip(generations, echo) if e]
                self.stream(p, generations, head, choice, first, used, dropped)
            else:
                self.wait_all(generations)
                choices = [dict(text=e + g.text, index=g.index, logprobs=None, finish_reason=g.finish_reason)
                           for g, e in zip(generations, echo)]
                self.send_json(200, dict(head, choices=choices, usage=usage(p, generations, used, dropped)))
        finally:
            for g in generations:  # a client that went away: its rows stop decoding
                g.cancelled.set()

    def chat(self, p):
        """A chat completion: the reply to p['messages'] (lib/serving.start_chat_generations), in
        OpenAI's chat.completion shape, or chat.completion.chunk events when streamed."""
        server = self.server
        generations, used, dropped = start_chat_generations(p, server.tokenizer, server.engine)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", object='chat.completion',
                    created=int(time.time()), model=server.name)

        def choice(g, piece):  # piece None: the choice's end, an empty delta with the reason
            return dict(index=g.index, delta={} if piece is None else {'content': piece}, logprobs=None,
                        finish_reason=None if piece is not None else g.finish_reason)
        try:
            if p['stream']:
                first = [dict(index=g.index, delta={'role': 'assistant', 'content': ''}, logprobs=None,
                              finish_reason=None) for g in generations]
                self.stream(p, generations, dict(head, object='chat.completion.chunk'), choice, first, used,
                            dropped)
            else:
                self.wait_all(generations)
                choices = [dict(index=g.index, message={'role': 'assistant', 'content': g.text},
                                logprobs=None, finish_reason=g.finish_reason) for g in generations]
                self.send_json(200, dict(head, choices=choices, usage=usage(p, generations, used, dropped)))
        finally:
            for g in generations:
                g.cancelled.set()

    def wait_all(self, generations):
        self.looked = time.time()  # when wait_for last looked at the connection
        for g in generations:
            while self.wait_for(g) is not None:
                pass

    def wait_for(self, g):
        """g's next event; raises ConnectionResetError once the client has hung up (looked at
        every quarter second, so a long answer nobody waits for stops decoding)."""
        while True:
            if time.time() - self.looked > 0.25:
                self.looked = time.time()
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):  # end of file: gone
                    raise ConnectionResetError('the client went away')
            try:
                return g.events.get(timeout=0.25)
            except queue.Empty:
                pass

    def stream(self, p, generations, head, choice, first, used, dropped):
        """Server-sent events: the `first` choices (an echo, a chat's role), then an event for each
        piece of text of any choice as it comes (choice(g, piece); piece None: g's end), the
        usage when stream_options asks for it, then [DONE]."""
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = True

        def send(choices, **extra):
            self.wfile.write(f"data: {json.dumps(dict(head, choices=choices, **extra))}\n\n".encode())
            self.wfile.flush()
        for c in first:
            send([c])
        merged = queue.Queue()  # (generation, piece) from every choice, in the order they come

        def forward(g):
            while True:
                piece = g.events.get()
                merged.put((g, piece))
                if piece is None:
                    return
        for g in generations:
            threading.Thread(target=forward, args=(g,), daemon=True).start()
        left = len(generations)
        while left:
            g, piece = merged.get()
            left -= piece is None
            send([choice(g, piece)])
        if (p['stream_options'] or {}).get('include_usage'):
            send([], usage=usage(p, generations, used, dropped))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def attention(self, body):
        """The playground's heatmaps: {"text": ...} -> the tokens and every layer's and head's
        attention probabilities (lib/plotting.py's attention_maps), for at most the last 64 tokens."""
        try:
            text = json.loads(body).get('text')
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str) or not text:
            raise RequestError('send {"text": "..."}: the text to draw the attention of', param='text')
        ids, _ = encode(text, self.server.tokenizer, min(64, self.server.block_size))
        engine = self.server.engine
        with torch.inference_mode():
            maps = attention_maps(engine.model, torch.tensor([ids], device=engine.dev.device))  # n_layer x (1, nh, T, T)
        self.send_json(200, dict(tokens=[self.server.tokenizer.decode([i]) for i in ids],
                                 maps=[[[[round(p, 4) for p in row] for row in head] for head in layer[0].float().tolist()]
                                       for layer in maps]))


def usage(p, generations, used, dropped):
    """OpenAI's usage: prompt tokens (each choice's prompt counted, as each is run), completion
    tokens; and prompt_tokens_dropped, what did not fit the context (an extension)."""
    completion = sum(len(g.tokens) for g in generations)
    prompt = used * p['n']
    return dict(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                prompt_tokens_dropped=dropped)


# -----------------------------------------------------------------------------
# command line

def load(argv):
    """The knobs and a ready engine (not started): (cfg, engine, model name, largest max_tokens, load info)."""
    cfg = dict(DEFAULTS)
    overrides = cli.load_config(DEFAULTS, argv)
    cfg.update(overrides)
    cli.check_knobs(cfg, RULES)
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], 'out_dir' in overrides, what='serve')
    model, info, dev = loading.load_model_on_device(cfg['init_from'], cfg['out_dir'], cfg['device'], cfg['dtype'])
    tokenizer = loading.load_tokenizer_for(info, cfg['data_dir'] or None)
    quantize_model(model, cfg['quantize'])
    block_size = model.config.block_size
    max_tokens = min(cfg['max_tokens_limit'] or block_size - 1, block_size - 1)
    name = Path(cfg['out_dir']).name if cfg['init_from'] == 'resume' else cfg['init_from']
    return cfg, Engine(model, tokenizer, dev, cfg['max_batch']), name, max_tokens, info


def main(argv):
    cfg, engine, name, max_tokens, info = load(argv)
    tokenizer, block_size = engine.tokenizer, engine.model.config.block_size
    try:
        server = Server((cfg['host'], cfg['port']), engine, name, max_tokens)
    except OSError as e:
        cli.die(f"cannot listen on {cfg['host']}:{cfg['port']}: {e.strerror or e}; choose another --port")
    engine.thread.start()
    address = f"http://{cfg['host']}:{server.server_address[1]}"
    chat = ', a chat model' if server.chat else ''
    example = (('chat/completions', '{"messages": [{"role": "user", "content": "Hello"}]}') if server.chat
               else ('completions', '{"prompt": "Hello", "max_tokens": 20}'))
    print(f"serving {info['source']}{chat} ({tokenizer.name} tokenizer, context {block_size}) at {address}\n"
          f"  playground: {address}/\n"
          f"  try: curl {address}/v1/{example[0]} -H 'Content-Type: application/json' -d '{example[1]}'",
          flush=True)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    engine.stopping = True
    server.server_close()
    print("stopped", flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
