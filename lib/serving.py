"""
What serve.py serves with: one generation per requested choice, the Engine that decodes every
running generation together (one batch on the KV cache, rows joining and leaving between steps),
and the completions and chat completions request schemas checked field by field (RequestError:
an OpenAI-style error).
"""

import collections
import json
import os
import queue
import sys
import threading

import torch

from lib import cli
from lib.chat import check_messages, fit_history, missing_characters, prompt_limit, render_prompt
from lib.sampling import StreamPrinter, encode_prompt
from lib.tokenfiles import PrepareError
from model import KVCache, sample_next


class RequestError(Exception):
    """A bad request: HTTP status, OpenAI-style error type, the parameter at fault and any
    headers the answer needs (Allow for a 405)."""

    def __init__(self, message, param=None, status=400, kind='invalid_request_error', headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers = headers or {}

    def body(self):
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': None}}


# -----------------------------------------------------------------------------
# one generation: what a request asks for, what it has produced, how it ends

def end_ids(tokenizer):
    """The ids that end a generation (finish_reason 'stop'; not part of the text). A chat run's
    markers: <|end|> closes the reply and another marker would open a new message (as
    lib/chat.reply_tokens stops). Else GPT-2's or an own BPE's <|endoftext|>; none for characters.
    (A chat tokenizer encodes '<|endoftext|>' as plain text: never ask it for that id.)"""
    special = tokenizer.special_ids
    if special:
        return frozenset(special.values())
    if tokenizer.name in ('gpt2', 'bpe'):
        return frozenset(tokenizer.encode('<|endoftext|>')[:1])
    return frozenset()


class Generation:
    """One choice of one prompt. The engine appends tokens; the HTTP thread reads the text pieces
    from `events` (None when it is finished) and may cancel it (a client that went away)."""

    def __init__(self, prompt, params, tokenizer, index, seed, device):
        self.prompt, self.params, self.index = prompt, params, index
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.tokens, self.text, self.sent = [], '', 0  # generated ids, their text, characters sent
        self.finish_reason = None
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.printer = StreamPrinter(tokenizer, out=self, unprinted=prompt)  # whole characters only
        self.stops = params['stop']
        self.ends = end_ids(tokenizer)

    def write(self, piece):  # StreamPrinter's output: the text grows by whole characters
        self.text += piece

    def flush(self):
        pass

    def add(self, token):
        """Record a new token; returns True when this generation is finished."""
        if token in self.ends:
            self.finish_reason = 'stop'  # the model ended the text (a document end, a chat reply's end)
        else:
            self.tokens.append(token)
            self.printer.add([token])
            cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], 'stop'
            elif len(self.tokens) >= self.params['max_tokens']:
                self.finish_reason = 'length'
        if self.finish_reason is None:
            # hold back what may be the start of a stop string, so a stop is never half sent
            hold = max((len(s) - 1 for s in self.stops), default=0)
            ready = len(self.text) - hold
        else:
            ready = len(self.text)
        if ready > self.sent:
            self.events.put(self.text[self.sent:ready])
            self.sent = ready
        if self.finish_reason is not None:
            self.events.put(None)
        return self.finish_reason is not None


# -----------------------------------------------------------------------------
# the engine: one thread decodes every running generation together

class RowCache(KVCache):
    """The engine's batch cache: rows of different lengths (pos a (B,) tensor, each row's next
    position) decode together, one token per row per step, each row attending to its own keys
    only. Engine.prefill fills a row from a prompt's own cache; model.py never makes one."""

    def update(self, layer, k, v):
        rows, end = torch.arange(k.size(0), device=k.device), int(self.pos.max()) + 1
        self.k[layer][rows, :, self.pos] = k[:, :, 0]  # (B, nh, hs) into each row's next slot
        self.v[layer][rows, :, self.pos] = v[:, :, 0]
        seen = torch.arange(end, device=k.device) <= self.pos[:, None]  # (B, end)
        mask = None if bool(seen.all()) else seen[:, None, None]  # (B, 1, 1, end)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask  # (B, nh, end, hs)


class Engine:
    """Continuous batching on one KV cache: each running generation is a row of a batch cache
    (rows of different lengths: RowCache). A new request's prompt is
    run alone (its prefill), its keys and values copied into a free row, and from the next step
    on it decodes with the others; a finished or cancelled row is replaced by the last one."""

    def __init__(self, model, tokenizer, dev, max_batch):
        self.model, self.tokenizer, self.dev, self.max_batch = model, tokenizer, dev, max_batch
        self.pending = queue.Queue()
        self.rows = []  # the running generations, row i of the batch cache
        self.cache = None  # RowCache of max_batch rows, allocated at the first prefill
        self.last = torch.zeros(max_batch, 1, dtype=torch.long, device=dev.device)  # each row's latest token
        self.vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < model.config.vocab_size else None
        self.stopping = False
        self.finished = collections.Counter()  # generations ended, by finish_reason (/health)
        self.generated = 0  # tokens sampled since the start (/health)
        self.thread = threading.Thread(target=self.run, name='engine', daemon=True)

    def submit(self, generations):
        for g in generations:
            self.pending.put(g)

    def run(self):
        while not self.stopping:
            try:
                self.admit()
                if not self.rows:
                    self.admit_wait()
                    continue
                self.step()
            except Exception as e:  # a model error must not leave clients waiting forever
                print(f"engine error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for g in self.rows:
                    g.finish_reason = 'error'
                    g.events.put(None)
                self.finished['error'] += len(self.rows)
                self.rows = []

    def admit_wait(self):
        try:
            g = self.pending.get(timeout=0.2)
        except queue.Empty:
            return
        self.pending.put(g)  # admit() takes it in order

    def admit(self):
        while len(self.rows) < self.max_batch and not self.pending.empty():
            g = self.pending.get()
            if g.cancelled.is_set():
                self.finished['cancelled'] += 1
                continue
            self.prefill(g)

    @torch.inference_mode()
    def prefill(self, g):
        model, n = self.model, len(self.rows)
        alone = KVCache(model.config.n_layer, model.config.block_size)
        prompt = torch.tensor([g.prompt], dtype=torch.long, device=self.dev.device)
        with self.dev.autocast():
            hidden = model._hidden(prompt, alone, last_only=True)[:, -1]  # (1, C)
        if self.cache is None:
            self.cache = RowCache(model.config.n_layer, model.config.block_size)
            self.cache.k = [torch.zeros((self.max_batch,) + k.shape[1:], dtype=k.dtype, device=k.device)
                            for k in alone.k]  # (max_batch, nh, block_size, hs)
            self.cache.v = [torch.zeros_like(k) for k in self.cache.k]
            self.cache.pos = torch.zeros(self.max_batch, dtype=torch.long, device=self.dev.device)
            if alone.prev is not None:  # bigram models: each row's last token
                self.cache.prev = torch.zeros(self.max_batch, dtype=torch.long, device=self.dev.device)
        T = len(g.prompt)
        for layer in range(model.config.n_layer):
            self.cache.k[layer][n, :, :T] = alone.k[layer][0, :, :T]
            self.cache.v[layer][n, :, :T] = alone.v[layer][0, :, :T]
        self.cache.pos[n] = T
        if alone.prev is not None:
            self.cache.prev[n] = alone.prev[0]
        self.rows.append(g)
        self.sample(hidden, [n])  # its first token

    @torch.inference_mode()
    def step(self):
        """One new token for every running row."""
        n = len(self.rows)
        view = RowCache(self.model.config.n_layer, self.model.config.block_size)
        view.k, view.v = [k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v]
        view.pos = self.cache.pos[:n]  # a view: the step advances the engine's positions too
        view.prev = self.cache.prev[:n] if self.cache.prev is not None else None  # and the bigram's last tokens
        with self.dev.autocast():
            hidden = self.model._hidden(self.last[:n], view)[:, -1]  # (n, C)
        self.sample(hidden, range(n))

    def sample(self, hidden, rows):
        with self.dev.autocast():
            logits = self.model.softcap(self.model.lm_head(hidden))  # (len(rows), V)
        if self.vocab_limit is not None:
            logits = logits[:, :self.vocab_limit]
        done = []
        self.generated += len(rows)
        for i, row in enumerate(rows):
            g, p = self.rows[row], self.rows[row].params
            token = sample_next(logits[i:i + 1], p['temperature'], p['top_k'], p['top_p'], g.generator)
            self.last[row, 0] = token
            full = int(self.cache.pos[row]) >= self.model.config.block_size  # no slot left to feed it
            if g.add(int(token)) or g.cancelled.is_set() or full:
                if g.finish_reason is None:
                    g.finish_reason = 'length' if full else 'cancelled'
                    g.events.put(None)
                self.finished[g.finish_reason] += 1
                done.append(row)
        for row in sorted(done, reverse=True):
            self.remove(row)

    def remove(self, row):
        """Drop a row; the last row moves into its place, so the running rows stay 0..n-1."""
        last = len(self.rows) - 1
        if row != last:
            for k in self.cache.k + self.cache.v:
                k[row] = k[last]
            self.cache.pos[row] = self.cache.pos[last]
            if self.cache.prev is not None:
                self.cache.prev[row] = self.cache.prev[last]
            self.last[row] = self.last[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()


# -----------------------------------------------------------------------------
# requests: OpenAI's completions and chat completions schemas, checked field by field

SAMPLING = {  # the fields both endpoints take, name: (type(s), default); None default = optional
    'model': (str, None), 'max_tokens': (int, 16), 'temperature': ((int, float), 1.0),
    'top_p': ((int, float), 1.0), 'top_k': (int, 0), 'n': (int, 1), 'stream': (bool, False), 'seed': (int, None),
    'stop': ((str, list, type(None)), None), 'user': (str, None), 'presence_penalty': ((int, float), 0),
    'frequency_penalty': ((int, float), 0), 'stream_options': (dict, None), 'logit_bias': (dict, None),
}
FIELDS = {'prompt': ((str, list), None), **SAMPLING, 'echo': (bool, False), 'logprobs': (type(None), None),
          'best_of': (int, 1), 'suffix': (type(None), None)}
CHAT_FIELDS = {'messages': (list, None), **SAMPLING, 'max_tokens': (int, None),  # default: until <|end|>
               'max_completion_tokens': (int, None), 'logprobs': ((bool, type(None)), None),
               'top_logprobs': ((int, type(None)), None)}
MESSAGE_KEYS = ('role', 'content', 'name')  # a message's name is accepted and ignored, as `user` is


def parse_body(body, fields, example):
    """(the request object, each field's value or default): the body as JSON, its fields known
    and of the right types."""
    try:
        request = json.loads(body or b'')
    except (ValueError, UnicodeDecodeError):
        raise RequestError(f"the body is not valid JSON; send a JSON object like {example}") from None
    if not isinstance(request, dict):
        raise RequestError(f"the body must be a JSON object, got a JSON {type(request).__name__}")
    for key, value in request.items():
        if key not in fields:
            raise RequestError(f"unknown field {key!r}; known: {', '.join(fields)}", param=key)
        kinds = fields[key][0]
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds in (int, (int, float))):
            want = ' or '.join('null' if k is type(None) else k.__name__
                               for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise RequestError(f"{key} must be {want}, got {type(value).__name__}", param=key)
    return request, {k: request.get(k, default) for k, (_, default) in fields.items()}


def check_sampling(request, p, server, checks=()):
    """The ranges of the fields both endpoints take (and `checks`: (field, ok, what it must be));
    p made ready for the engine: stop a list, top_k and top_p None when they do nothing."""
    stops = [] if p['stop'] is None else [p['stop']] if isinstance(p['stop'], str) else p['stop']
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", param='stop')
    checks = [('max_tokens', 1 <= p['max_tokens'] <= server.max_tokens, f"between 1 and {server.max_tokens} "
               f"(the model's context is {server.block_size} tokens)"),
              ('temperature', 0 <= p['temperature'] <= 2, "between 0 and 2"),
              ('top_p', 0 < p['top_p'] <= 1, "in (0, 1]"), ('top_k', p['top_k'] >= 0, ">= 0 (0: no limit)"),
              ('n', 1 <= p['n'] <= server.max_batch, f"between 1 and {server.max_batch}"),
              ('presence_penalty', p['presence_penalty'] == 0, "0 (penalties are not supported)"),
              ('frequency_penalty', p['frequency_penalty'] == 0, "0 (penalties are not supported)"),
              ('logit_bias', not p['logit_bias'], "empty (logit_bias is not supported)"), *checks]
    for key, ok, want in checks:
        if not ok:
            raise RequestError(f"{key} must be {want}, got {request.get(key)!r}", param=key)
    p.update(stop=stops, top_k=p['top_k'] or None, top_p=p['top_p'] if p['top_p'] < 1 else None,
             temperature=float(p['temperature']))
    return p


def read_request(body, server):
    """The checked parameters of a completions request; RequestError for anything it cannot do."""
    request, p = parse_body(body, FIELDS, '{"prompt": "Hello"}')
    if p['prompt'] is None:
        raise RequestError("prompt is required (a string or a list of strings)", param='prompt')
    prompts = [p['prompt']] if isinstance(p['prompt'], str) else p['prompt']
    if not prompts or not all(isinstance(s, str) for s in prompts):
        raise RequestError("prompt must be a string or a non-empty list of strings (token arrays are not "
                           "supported)", param='prompt')
    p['prompts'] = prompts
    return check_sampling(request, p, server, [('best_of', p['best_of'] == 1,
                                                "1 (best_of is not supported)")])


def read_chat_request(body, server):
    """The checked parameters of a chat completions request: p['messages'] is the conversation,
    its last message the user's, which the reply answers. RequestError for anything it cannot do,
    a run not fine-tuned for chat included."""
    if not server.tokenizer.special_ids:
        raise RequestError(f"{server.name} was not trained for chat (its tokenizer has no chat tokens): "
                           f"use /v1/completions, or fine-tune it on chat data first (docs/chat.md)",
                           param='model')
    request, p = parse_body(body, CHAT_FIELDS, '{"messages": [{"role": "user", "content": "Hello"}]}')
    messages = p['messages']
    if not messages:
        what = 'required' if messages is None else 'an empty list'
        raise RequestError(f'messages is {what}: send a list of {{"role": ..., "content": ...}} objects, '
                           "the last one the user's", param='messages')
    for i, message in enumerate(messages):
        extra = [k for k, v in message.items() if k not in MESSAGE_KEYS and v not in (None, '', [], {})] \
            if isinstance(message, dict) else []
        if extra:
            raise RequestError(f"message {i} has {extra[0]!r}: tools, images and audio are not supported; "
                               f"send a role and a text content", param='messages')
    try:
        check_messages(messages, need_assistant=False)
    except ValueError as e:
        raise RequestError(str(e), param='messages') from None
    if messages[-1]['role'] != 'user':
        raise RequestError(f"the last message is the {messages[-1]['role']}'s: a reply answers the user, so "
                           f"end the messages with the user's message", param='messages')
    if p['max_completion_tokens'] is not None:  # OpenAI's newer name for max_tokens
        if p['max_tokens'] not in (None, p['max_completion_tokens']):
            raise RequestError("max_tokens and max_completion_tokens differ; send one of them",
                               param='max_completion_tokens')
        p['max_tokens'] = p['max_completion_tokens']
    if p['max_tokens'] is None:  # OpenAI's default: until the reply ends or the context is full
        p['max_tokens'] = server.max_tokens
    return check_sampling(request, p, server, [
        ('logprobs', not p['logprobs'], "false (logprobs are not supported)"),
        ('top_logprobs', not p['top_logprobs'], "left out (logprobs are not supported)")])


def encode(text, tokenizer, drop_to):
    """Token ids of a prompt, cut from the left to drop_to tokens; (ids, tokens dropped)."""
    try:
        ids = encode_prompt(text, tokenizer, 1 << 30, quiet=True)
    except cli.ConfigError as e:
        raise RequestError(e.message, param='prompt') from None
    return ids[-drop_to:], max(0, len(ids) - drop_to)


def start_generations(p, tokenizer, engine):
    """Hand a checked completions request's choices to the engine; (generations, prompt tokens,
    tokens dropped)."""
    room = engine.model.config.block_size - p['max_tokens']  # a prompt keeps its last `room` tokens
    prompts, used, dropped = [], 0, 0
    for text in p['prompts']:
        ids, cut = encode(text, tokenizer, room)
        prompts.append(ids)
        used, dropped = used + len(ids), dropped + cut
    return submit(prompts, p, tokenizer, engine), used, dropped


def start_chat_generations(p, tokenizer, engine):
    """Hand a checked chat request's choices to the engine: the conversation in the chat template
    and <|assistant|> (lib/chat.render_prompt), its oldest turns dropped until it fits, as
    sample.py --chat does (lib/chat.fit_history). (generations, prompt tokens, tokens dropped)."""
    limit = prompt_limit(engine.model.config.block_size, p['max_tokens'])
    try:
        prompt = fit_history(p['messages'], tokenizer, limit)[0]
        whole = len(render_prompt(p['messages'], tokenizer))
    except PrepareError as e:  # a character vocabulary without a character of the messages
        missing = missing_characters(''.join(m['content'] for m in p['messages']), tokenizer)
        if not missing:
            raise RequestError(f"cannot encode the messages: {e}", param='messages') from None
        raise RequestError(f"the messages have {len(missing)} character(s) missing from the model's "
                           f"{tokenizer.vocab_size - len(tokenizer.special_ids)}-character vocabulary: "
                           f"{' '.join(map(repr, missing[:10]))}", param='messages') from None
    return submit([prompt], p, tokenizer, engine), len(prompt), whole - len(prompt)


def submit(prompts, p, tokenizer, engine):
    """p['n'] generations of each prompt (token ids), seeded seed, seed + 1, ..., started."""
    generations = []
    for i, ids in enumerate(prompts):
        for j in range(p['n']):
            seed = p['seed'] + len(generations) if p['seed'] is not None else int.from_bytes(os.urandom(4), 'little')
            generations.append(Generation(ids, p, tokenizer, i * p['n'] + j, seed, engine.dev.device))
    engine.submit(generations)
    return generations
