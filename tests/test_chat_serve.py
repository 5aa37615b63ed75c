"""
Chat over HTTP: serve.py's POST /v1/chat/completions on tiny chat runs (a character tokenizer with
the chat tokens, saved as train.py saves a run): the official openai client gets the replies
sample.py --chat prints, history and all; a reply ends at <|end|>; bad chat requests are refused
and the server goes on; the playground's chat in a real headless browser (Debian's chromium).
"""

import http.client
import io
import json
import random
import sys
from contextlib import redirect_stdout

import pytest
import torch

import sample
from helpers import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM, Server
from lib import chat, runs, serving, tokenizers
from model import GPT, GPTConfig

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz :?.!,"))
TOKENIZER = tokenizers.chat_tokenizer(tokenizers.char_tokenizer(CHARS))
END = TOKENIZER.special_ids[chat.END]
TAUGHT = "a fox."  # what the taught run replies to any message


def user(content):
    return {"role": "user", "content": content}


def save_run(model, folder, data):
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': 'chat', 'data_dir': str(data)}}, folder / 'ckpt.pt')
    return folder


def new_model(block_size):
    """Random weights, the output head untied: a random tied model's likeliest next token is the
    one it was fed, <|assistant|> after the prompt, a marker that ends every reply at once."""
    torch.manual_seed(1)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                         vocab_size=TOKENIZER.vocab_size, pos_emb='rope', dropout=0.0, tie_embeddings=False))


@pytest.fixture(scope='module')
def runs_dir(tmp_path_factory):
    """The chat data's metadata (what prepare.py chat writes: characters and the chat ids) and
    three runs on it: 'random' (random weights), 'taught' (replies TAUGHT, then <|end|>) and
    'long' (a 4,096-token context whose greedy reply never writes a marker: time to press Stop)."""
    root = tmp_path_factory.mktemp('chat_serve')
    data = root / 'data'
    data.mkdir()
    (data / 'meta.json').write_text(json.dumps({'vocab_size': TOKENIZER.vocab_size, 'tokenizer': 'char',
                                                'chars': CHARS, 'chat': chat.chat_entry(TOKENIZER)}))
    save_run(new_model(64), root / 'random', data)
    save_run(taught_model(), root / 'taught', data)
    long = new_model(4096)
    with torch.no_grad():  # a marker's logit is 0, below the best of the other ids
        long.lm_head.weight[list(TOKENIZER.special_ids.values())] = 0.0
    save_run(long, root / 'long', data)
    return root


def taught_model(steps=40):
    """A 64-token model taught, in process, to answer every question with TAUGHT: the assistant's
    tokens (and its <|end|>) as targets, as train.py's chat loss counts them."""
    model, rng = new_model(64), random.Random(0)
    words = "the quick brown fox jumps over a lazy dog what is it?".split()
    rows = [chat.render([user(" ".join(rng.choices(words, k=rng.randint(1, 5)))),
                         {"role": "assistant", "content": TAUGHT}], TOKENIZER) for _ in range(32)]
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1)  # -1: not a target (model.py's ignore_index)
    for row, (ids, mask) in enumerate(rows):
        x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope='module')
def server(runs_dir):
    with Server(f'--out_dir={runs_dir / "random"}', '--max_batch=8') as s:
        yield s


@pytest.fixture(scope='module')
def taught(runs_dir):
    with Server(f'--out_dir={runs_dir / "taught"}') as s:
        yield s


def sample_chat(run, *argv, stdin=''):
    """What sample.py --chat prints (in process): each reply, one line each."""
    out, real = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out):
            sample.main([f'--out_dir={run}', '--device=cpu', '--chat', *argv])
    finally:
        sys.stdin = real
    return out.getvalue().splitlines()


def client(server):
    openai = pytest.importorskip('openai')
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not needed", max_retries=0)


# ----------------------------------------------------------------------------- replies

def test_the_openai_client_gets_the_reply_sample_py_chat_prints(server, runs_dir):
    chat_client, run = client(server), runs_dir / 'random'
    assert [(m.id, m.chat) for m in chat_client.models.list().data] == [('random', True)]
    greedy = chat_client.chat.completions.create(model='random', messages=[user('the fox?')], max_tokens=12,
                                                 temperature=0)
    reply = greedy.choices[0].message
    assert greedy.object == 'chat.completion' and reply.role == 'assistant' and reply.content  # not empty
    assert [reply.content] == sample_chat(run, '--start=the fox?', '--max_new_tokens=12', '--temperature=0')
    prompt = chat.render_prompt([user('the fox?')], TOKENIZER)
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (len(prompt), len(reply.content))
    assert greedy.choices[0].finish_reason == ('length' if len(reply.content) == 12 else 'stop')
    seeded = chat_client.chat.completions.create(model='random', messages=[user('why?')], max_tokens=12,
                                                 temperature=0.9, seed=7)
    assert [seeded.choices[0].message.content] == sample_chat(run, '--start=why?', '--max_new_tokens=12',
                                                              '--temperature=0.9', '--seed=7', '--top_k=0')
    chunks = list(chat_client.chat.completions.create(
        model='random', messages=[user('why?')], max_tokens=12, temperature=0.9, seed=7, stream=True,
        stream_options={'include_usage': True}))
    assert chunks[0].object == 'chat.completion.chunk' and chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks[:-1]) == seeded.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == seeded.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == seeded.usage.completion_tokens


def test_the_history_is_sample_py_chats_oldest_turns_dropped_first(server, runs_dir):
    """Four messages typed into sample.py --chat, and the same chat sent message by message with
    the replies so far: the same replies. A 64-token context with 12 kept for the reply: the
    later prompts drop their oldest turns, and usage says how many tokens."""
    said = ['the quick fox?', 'a lazy dog.', 'what is it?', 'jumps over!']
    replies = sample_chat(runs_dir / 'random', '--max_new_tokens=12', '--temperature=0',
                          stdin='\n'.join(said))
    assert len(replies) == 4
    messages, dropped = [], []
    for text, expected in zip(said, replies):
        messages.append(user(text))
        status, r = server.post('/v1/chat/completions', dict(messages=messages, max_tokens=12, temperature=0))
        assert status == 200 and r['choices'][0]['message'] == {'role': 'assistant', 'content': expected}, r
        whole, kept = len(chat.render_prompt(messages, TOKENIZER)), chat.fit_history(messages, TOKENIZER, 52)[0]
        assert chat.prompt_limit(64, 12) == 52 and r['usage']['prompt_tokens'] == len(kept)  # whole turns
        assert r['usage']['prompt_tokens'] + r['usage']['prompt_tokens_dropped'] == whole
        dropped.append(r['usage']['prompt_tokens_dropped'])
        messages.append({'role': 'assistant', 'content': expected})
    assert dropped[0] == 0 and dropped[-1] > 0, dropped


def test_a_reply_ends_at_the_end_marker(taught):
    status, r = taught.post('/v1/chat/completions', dict(messages=[user('what is it?')], temperature=0))
    assert status == 200 and r['choices'][0]['message']['content'] == TAUGHT, r
    assert r['choices'][0]['finish_reason'] == 'stop' and r['usage']['completion_tokens'] == len(TAUGHT)
    for extra, reply in (dict(max_tokens=3), (TAUGHT[:3], 'length')), (dict(stop='x.'), ('a fo', 'stop')):
        r = taught.post('/v1/chat/completions', dict(messages=[user('the dog?')], temperature=0, **extra))[1]
        assert (r['choices'][0]['message']['content'], r['choices'][0]['finish_reason']) == reply, r
    # a system message first, a whole conversation, two choices: each ends at its <|end|>
    messages = [{'role': 'system', 'content': 'be brief.'}, user('a fox?'),
                {'role': 'assistant', 'content': 'no'}, user('a dog?')]
    status, r = taught.post('/v1/chat/completions', dict(messages=messages, temperature=0, n=2))
    assert [(c['index'], c['message']['content'], c['finish_reason']) for c in r['choices']] == \
        [(0, TAUGHT, 'stop'), (1, TAUGHT, 'stop')]


def test_a_streamed_reply_arrives_token_by_token_and_ends_at_the_end_marker(taught):
    conn = http.client.HTTPConnection('127.0.0.1', taught.port, timeout=60)
    conn.request('POST', '/v1/chat/completions', json.dumps(dict(messages=[user('the fox?')], temperature=0,
                                                                 stream=True)))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader('Content-Type') == 'text/event-stream'
    events = [e.removeprefix('data: ') for e in r.read().decode().split('\n\n') if e]
    assert events[-1] == '[DONE]'
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c['object'] for c in chunks} == {'chat.completion.chunk'} and len({c['id'] for c in chunks}) == 1
    deltas = [c['choices'][0]['delta'] for c in chunks]
    assert deltas[0] == {'role': 'assistant', 'content': ''} and deltas[-1] == {}
    assert [d['content'] for d in deltas[1:-1]] == list(TAUGHT)  # a piece per character token
    assert [c['choices'][0]['finish_reason'] for c in chunks] == [None] * (len(chunks) - 1) + ['stop']


def test_a_chat_run_ends_at_its_markers_and_never_at_spelled_text():
    """The end-of-text ids come from the chat tokenizer's markers: it encodes '<|endoftext|>' as
    the text's own tokens, so asking it for that id gave the id of '<'."""
    try:
        gpt2 = tokenizers.gpt2_tokenizer()
    except tokenizers.PrepareError as e:
        pytest.skip(str(e))
    chat_gpt2 = tokenizers.chat_tokenizer(gpt2)
    assert serving.end_ids(gpt2) == {50256}
    assert serving.end_ids(chat_gpt2) == {50257, 50258, 50259, 50260}
    assert chat_gpt2.encode('<|endoftext|>')[0] == gpt2.encode('<')[0]  # the old wrong id
    assert serving.end_ids(TOKENIZER) == set(range(len(CHARS), len(CHARS) + 4))
    assert serving.end_ids(tokenizers.char_tokenizer(CHARS)) == set()
    p = dict(stop=[], max_tokens=10)
    for marker in TOKENIZER.special_ids.values():  # <|end|>, or a marker opening another message
        g = serving.Generation([1], p, TOKENIZER, 0, 0, 'cpu')
        assert not g.add(TOKENIZER.encode('a')[0]) and g.add(marker)
        assert (g.text, g.tokens, g.finish_reason) == ('a', [TOKENIZER.encode('a')[0]], 'stop')


# ----------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize('body, param, fragment', [
    (b'{"messages": [', None, 'not valid JSON'),
    ({}, 'messages', 'messages is required'),
    ({'messages': []}, 'messages', 'messages is an empty list'),
    ({'messages': 'hi'}, 'messages', 'messages must be list'),
    ({'messages': ['hi']}, 'messages', 'message 0 is a str'),
    ({'messages': [{'role': 'tool', 'content': 'hi'}]}, 'messages', "role 'tool'"),
    ({'messages': [{'content': 'hi'}]}, 'messages', 'role None'),
    ({'messages': [{'role': 'user'}]}, 'messages', 'has no content'),
    ({'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}]}, 'messages',
     'content of type list'),
    ({'messages': [user('hi'), {'role': 'assistant', 'content': 'ho'}]}, 'messages', "the assistant's"),
    ({'messages': [{'role': 'system', 'content': 'be brief.'}]}, 'messages', "the system's"),
    ({'messages': [dict(user('hi'), tool_calls=[{'id': 'x'}])]}, 'messages', "'tool_calls'"),
    ({'messages': [user('Zebra ~')]}, 'messages', "'Z' '~'"),
    ({'messages': [user('hi')], 'max_tokens': 'ten'}, 'max_tokens', 'must be int'),
    ({'messages': [user('hi')], 'max_tokens': 64}, 'max_tokens', 'between 1 and 63'),
    ({'messages': [user('hi')], 'max_tokens': 5, 'max_completion_tokens': 6}, 'max_completion_tokens',
     'differ'),
    ({'messages': [user('hi')], 'n': 9}, 'n', 'between 1 and 8'),
    ({'messages': [user('hi')], 'temperature': 3}, 'temperature', 'between 0 and 2'),
    ({'messages': [user('hi')], 'logprobs': True}, 'logprobs', 'not supported'),
    ({'messages': [user('hi')], 'tools': []}, 'tools', 'unknown field'),
    ({'messages': [user('hi')], 'prompt': 'hi'}, 'prompt', 'unknown field'),
])
def test_bad_chat_requests_get_an_openai_error_and_the_server_goes_on(server, body, param, fragment):
    got, r = server.post('/v1/chat/completions', body, raw=isinstance(body, bytes))
    assert got == 400 and r['error']['type'] == 'invalid_request_error', r
    assert r['error']['param'] == param and fragment in r['error']['message'], r
    logged = [line for line in server.errors().splitlines() if r['error']['message'] in line]
    assert len(logged) == 1 and '" 400 ' in logged[0], logged  # one access line, with the reason
    assert server.get('/health')[0] == 200


def test_fields_openai_clients_send_are_accepted(server):
    """model, user, a message's name, null fields of a reply sent back, max_completion_tokens:
    accepted, and the reply is the one without them."""
    plain = server.post('/v1/chat/completions', dict(messages=[user('hi')], max_tokens=5, temperature=0))
    assert plain[0] == 200
    reply = dict(plain[1]['choices'][0]['message'], refusal=None, tool_calls=None, function_call=None)
    status, r = server.post('/v1/chat/completions', dict(
        model='gpt-4o', user='me', max_completion_tokens=5, temperature=0,
        stream_options={'include_usage': False}, messages=[dict(user('hi'), name='ann'), reply, user('hi')]))
    assert status == 200, r
    status, again = server.post('/v1/chat/completions', dict(messages=[user('hi'), reply, user('hi')],
                                                             max_tokens=5, temperature=0))
    assert r['choices'] == again['choices']


def test_bad_chat_requests_then_a_good_one_on_one_kept_alive_connection(server):
    good = json.dumps(dict(messages=[user('the fox?')], max_tokens=6, temperature=0))
    fresh = server.post('/v1/chat/completions', good, raw=True)
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=60)
    bad = ['{"messages": [', json.dumps({'messages': [{'role': 'tool', 'content': 'x'}]}), json.dumps({}),
           json.dumps({'messages': [user('hi')], 'max_tokens': 0})]
    for body in bad + [good]:
        conn.request('POST', '/v1/chat/completions', body, {'Content-Type': 'application/json'})
        r = conn.getresponse()
        answer = json.loads(r.read())
        if body != good:
            assert r.status == 400 and r.getheader('Connection') != 'close', answer
            sock = conn.sock
    assert conn.sock is sock and (r.status, answer['choices']) == (200, fresh[1]['choices'])


# ----------------------------------------------------------------------------- the playground

def turns(page):
    return page.evaluate("[...document.querySelectorAll('#turns .turn')].map("
                         "t => [t.dataset.role, t.querySelector('.content').textContent])")


def send(page, text):
    page.fill('#message', text)
    page.click('#send')
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=60000)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM or '')
def test_the_playground_chats_in_a_real_browser(server, runs_dir, tmp_path):
    """Type a message, see the reply stream in (a chunk per token) and equal the API's greedy
    reply; a second message is answered with the history; New chat forgets it; Stop stops a
    reply the server is still writing."""
    from playwright.sync_api import sync_playwright

    def greedy(messages):
        status, r = server.post('/v1/chat/completions', dict(messages=messages, max_tokens=12, temperature=0))
        return r['choices'][0]['message']['content']
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + '/')
            page.wait_for_function("document.body.dataset.mode === 'chat'", timeout=30000)
            assert page.is_visible('#message') and not page.is_visible('#prompt')
            assert not page.is_visible('#heatmap')  # attention maps draw text, not a chat's markers
            page.fill('#max_tokens', '12')
            page.fill('#temperature', '0')
            send(page, 'the fox?')
            first = greedy([user('the fox?')])
            assert turns(page) == [['user', 'the fox?'], ['assistant', first]]
            chunks = int(page.evaluate("document.body.dataset.chunks"))
            assert chunks == len(first) > 1  # streamed: a piece per character token
            send(page, 'why?')
            second = greedy([user('the fox?'), {'role': 'assistant', 'content': first}, user('why?')])
            assert turns(page)[2:] == [['user', 'why?'], ['assistant', second]]
            assert page.input_value('#message') == ''
            page.click('#new')
            assert turns(page) == []
            send(page, 'why?')
            assert turns(page) == [['user', 'why?'], ['assistant', greedy([user('why?')])]]
            page.screenshot(path=str(tmp_path / 'chat.png'))

            long = Server(f'--out_dir={runs_dir / "long"}')
            try:
                page.goto(long.url + '/')
                page.wait_for_function("document.body.dataset.mode === 'chat'", timeout=30000)
                page.fill('#temperature', '0')
                page.fill('#message', 'the fox?')
                page.click('#send')
                page.wait_for_function("(document.querySelector('#turns .turn:last-child .content') || {})"
                                       ".textContent?.length > 20", timeout=30000)
                page.click('#stop')
                page.wait_for_function("document.body.dataset.state === 'done'", timeout=30000)
                assert page.inner_text('#status') == 'stopped' and page.is_enabled('#send')
                health = long.health_when_idle()
                assert health['finished'] == {'cancelled': 1}, health
                assert turns(page)[-1][0] == 'assistant' and len(turns(page)[-1][1]) > 20  # kept as said
            finally:
                long.stop()
        finally:
            browser.close()
