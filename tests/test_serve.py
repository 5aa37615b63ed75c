"""
serve.py against a live server on 127.0.0.1 (an ephemeral port), started by the tests: the
official openai client, the same tokens as sample.py, batching of concurrent requests, bad
input that never takes the server down, a client that leaves mid-stream, a clean stop, and the
playground page in a real headless browser (Debian's chromium).
"""

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout

import pytest
import torch

from lib import runs
import sample
from lib import serving
from model import GPT, GPTConfig, KVCache
from helpers import CHROMIUM, CHROMIUM_ARGS, ENV, NO_CHROMIUM, REPO, Server, every_knob

CHARS = sorted(set("ROMEO: JULIET\nthe quick brown fox, jumps over lazy dogs.!?"))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A character model's run folder, saved the way train.py saves one (random weights)."""
    root = tmp_path_factory.mktemp('serve')
    data = root / 'data'
    data.mkdir()
    (data / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'tokenizer': 'char', 'chars': CHARS}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS), pos_emb='rope'))
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': 'chars', 'data_dir': str(data)}}, root / 'run' / 'ckpt.pt')
    return root / 'run'


@pytest.fixture(scope='module')
def server(run_dir):
    with Server(f'--out_dir={run_dir}', '--max_batch=8') as s:
        yield s


def sample_py(run_dir, *argv):
    out = io.StringIO()
    with redirect_stdout(out):
        sample.main([f'--out_dir={run_dir}', '--device=cpu', *argv])
    return out.getvalue().split('\n' + sample.SEPARATOR)[0]


def test_the_openai_client_gets_what_sample_py_prints(server, run_dir):
    openai = pytest.importorskip('openai')
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not needed")
    assert client.models.list().data[0].id == 'run'
    greedy = client.completions.create(model='run', prompt='ROMEO:', max_tokens=20, temperature=0)
    assert 'ROMEO:' + greedy.choices[0].text == sample_py(run_dir, '--start=ROMEO:', '--max_new_tokens=20',
                                                          '--temperature=0')
    assert greedy.choices[0].finish_reason == 'length'
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens, greedy.usage.total_tokens) == (6, 20, 26)
    seeded = client.completions.create(model='run', prompt='JULIET', max_tokens=15, temperature=0.9, seed=7)
    assert 'JULIET' + seeded.choices[0].text == sample_py(run_dir, '--start=JULIET', '--max_new_tokens=15',
                                                          '--temperature=0.9', '--seed=7', '--top_k=0')
    streamed = client.completions.create(model='run', prompt='JULIET', max_tokens=15, temperature=0.9, seed=7,
                                         stream=True)
    chunks = list(streamed)
    assert ''.join(c.choices[0].text for c in chunks) == seeded.choices[0].text
    assert chunks[-1].choices[0].finish_reason == 'length'


def test_prompts_n_stop_echo_and_top_k(server):
    status, r = server.post('/v1/completions', dict(prompt=['ROMEO', 'the'], n=2, max_tokens=5, seed=3))
    assert status == 200 and sorted(c['index'] for c in r['choices']) == [0, 1, 2, 3]
    by_index = sorted(r['choices'], key=lambda c: c['index'])
    # a character model has no end-of-text token: every choice runs its 5 tokens, 5 characters
    assert [(len(c['text']), c['finish_reason']) for c in by_index] == [(5, 'length')] * 4, by_index
    assert by_index[0]['text'] != by_index[1]['text']  # the prompt's two choices: other seeds, other texts
    status, full = server.post('/v1/completions', dict(prompt='the', max_tokens=30, temperature=0))
    text = full['choices'][0]['text']
    stop = text[5:7]
    status, stopped = server.post('/v1/completions', dict(prompt='the', max_tokens=30, temperature=0, stop=[stop]))
    assert stopped['choices'][0] == dict(text=text[:text.index(stop)], index=0, logprobs=None, finish_reason='stop')
    status, echoed = server.post('/v1/completions', dict(prompt='the', max_tokens=3, temperature=0, echo=True))
    assert echoed['choices'][0]['text'] == 'the' + text[:3]
    status, r = server.post('/v1/completions', dict(prompt='the', max_tokens=5, top_k=1, temperature=1.5))
    assert r['choices'][0]['text'] == text[:5]  # top_k=1 is greedy at any temperature


@pytest.mark.parametrize('body, status, param, fragment', [
    (b'{"prompt": "the"', 400, None, 'not valid JSON'),
    (b'[1, 2]', 400, None, 'JSON object'),
    ({'prompt': 'the', 'max_tokens': 'ten'}, 400, 'max_tokens', 'must be int'),
    ({'prompt': 'the', 'temperature': True}, 400, 'temperature', 'must be'),
    ({'prompt': 'the', 'colour': 'red'}, 400, 'colour', 'unknown field'),
    ({'prompt': 'the', 'max_tokens': 64}, 400, 'max_tokens', 'between 1 and 63'),
    ({'prompt': 'the', 'n': 9}, 400, 'n', 'between 1 and 8'),
    ({'prompt': 'the', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'stop', 'at most 4'),
    ({'prompt': 'the', 'presence_penalty': 0.5}, 400, 'presence_penalty', 'not supported'),
    ({'prompt': 'Zebra ~'}, 400, 'prompt', "'Z'"),
    ({'max_tokens': 5}, 400, 'prompt', 'required'),
    ({'prompt': [1, 2]}, 400, 'prompt', 'list of strings'),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, body, status, param, fragment):
    got, r = server.post('/v1/completions', body, raw=isinstance(body, bytes))
    assert got == status and set(r['error']) >= {'message', 'type', 'param'}, r
    assert r['error']['param'] == param and fragment in r['error']['message'], r
    assert server.get('/health')[0] == 200
    logged = [line for line in server.errors().splitlines() if r['error']['message'] in line]
    assert len(logged) == 1 and f'" {status} ' in logged[0], logged  # one access line, with the reason


def test_a_prompt_longer_than_the_context_is_cropped_from_the_left_and_said(server):
    status, r = server.post('/v1/completions', dict(prompt='the quick brown fox ' * 5, max_tokens=10))
    assert status == 200
    assert r['usage']['prompt_tokens'] == 64 - 10 and r['usage']['prompt_tokens_dropped'] == 100 - 54
    assert server.get('/nowhere')[0] == 404


def test_a_run_not_trained_for_chat_refuses_chat_and_names_the_completions_endpoint(server):
    assert json.loads(server.get('/v1/models')[1])['data'][0]['chat'] is False  # the playground reads it
    status, r = server.post('/v1/chat/completions', dict(messages=[{'role': 'user', 'content': 'the'}]))
    assert status == 400 and r['error']['type'] == 'invalid_request_error' and r['error']['param'] == 'model'
    assert r['error']['message'] == ("run was not trained for chat (its tokenizer has no chat tokens): use "
                                     "/v1/completions, or fine-tune it on chat data first (docs/chat.md)")


GOOD = json.dumps(dict(prompt='the', max_tokens=3, temperature=0))


def good_request(conn):
    """The greedy completion of 'the' on an open connection: what a request after a bad one must get."""
    conn.request('POST', '/v1/completions', GOOD, {'Content-Type': 'application/json'})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize('method, path, body, status', [
    ('POST', '/v1/chat/completions', json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]}), 400),
    ('POST', '/nope', '{"prompt": "the"}', 404),
    ('POST', '/v1/models', '{"prompt": "the"}', 405),
    ('POST', '/health', 'x' * 5000, 405),
    ('GET', '/health', '{"prompt": "the"}', 200),
    ('GET', '/v1/models', '{}', 200),
    ('GET', '/nowhere', 'POST /v1/completions HTTP/1.1', 404),
    ('POST', '/v1/completions', '{"prompt": "the", "max_tokens": 0}', 400),
    ('POST', '/v1/attention', '{"text": 5}', 400),
    ('POST', '/v1/completions?x=1', GOOD, 200),
])
def test_every_answer_leaves_a_kept_alive_connection_ready_for_the_next_request(server, method, path, body,
                                                                              status):
    """A request with a body, answered or refused, then a good request on the same connection:
    the body was read off the connection, so the good request is parsed from its own bytes and
    gets the same greedy text as on a fresh connection; the connection stays open."""
    expected = good_request(http.client.HTTPConnection('127.0.0.1', server.port, timeout=60))
    assert expected[0] == 200 and len(expected[1]['choices'][0]['text']) == 3
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=60)
    for _ in range(2):
        conn.request(method, path, body, {'Content-Type': 'application/json'})
        r = conn.getresponse()
        answer = json.loads(r.read())
        assert r.status == status, answer
        if status >= 400:
            assert set(answer['error']) >= {'message', 'type', 'param'}, answer
        if status == 405:
            assert r.getheader('Allow') == ('POST' if path.startswith('/v1/c') else 'GET')
        sock = conn.sock
        assert sock is not None and r.getheader('Connection') != 'close'  # kept alive
        got = good_request(conn)
        assert conn.sock is sock  # the same connection answered
        assert got[0] == 200 and got[1]['choices'] == expected[1]['choices'], got


@pytest.mark.parametrize('head, status, fragment', [
    (b'Content-Length: 2000000', 413, 'larger than 1 MiB'),
    (b'Content-Length: -5', 400, 'Content-Length'),
    (b'Content-Length: ten', 400, 'Content-Length'),
    (b'Transfer-Encoding: chunked', 411, 'Content-Length'),
])
def test_a_body_that_is_not_read_closes_the_connection(server, head, status, fragment):
    """A body the server will not read whole (too large, a length it cannot trust, chunked):
    an error that says Connection: close, and the connection ends instead of parsing the rest
    of the body as the next request."""
    with socket.create_connection(('127.0.0.1', server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" +
                     b'{"prompt": "the"}' + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b''
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    top, _, answer = got.partition(b'\r\n\r\n')
    lines = top.decode().split('\r\n')
    assert lines[0].startswith(f'HTTP/1.1 {status} ') and 'Connection: close' in lines, got
    assert fragment in json.loads(answer)['error']['message'] and got.count(b'HTTP/1.1') == 1, got
    assert server.get('/health')[0] == 200


@pytest.fixture(scope='module')
def long_run_dir(tmp_path_factory, run_dir):
    """The character model with room for 4,000 new tokens: a generation long enough to leave."""
    root = tmp_path_factory.mktemp('serve_long')
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=4096, vocab_size=len(CHARS), pos_emb='rope'))
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': 'chars', 'data_dir': str(run_dir.parent / 'data')}},
                         root / 'ckpt.pt')
    return root


def test_concurrent_requests_are_decoded_together(long_run_dir):
    """Eight clients at once share the batch: the server reports several rows running together."""
    server, seen, results = Server(f'--out_dir={long_run_dir}', '--max_batch=8'), [], []

    def client(i):
        results.append(server.post('/v1/completions', dict(prompt='the', max_tokens=600, seed=i))[0])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen.append(json.loads(server.get('/health')[1])['running'])
        time.sleep(0.005)
    for t in threads:
        t.join()
    server.stop()
    assert results == [200] * 8 and max(seen) > 1, seen


def test_a_client_that_leaves_stops_its_generation(long_run_dir):
    s = Server(f'--out_dir={long_run_dir}')
    try:
        def health():
            return json.loads(s.get('/health')[1])

        def ask(stream):
            sock = socket.create_connection(('127.0.0.1', s.port))
            body = json.dumps(dict(prompt='the', max_tokens=4000, stream=stream)).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            return sock

        def settled(cancelled):
            deadline = time.time() + 60
            while (health()['running'] or health()['finished'].get('cancelled', 0) < cancelled) \
                    and time.time() < deadline:
                time.sleep(0.02)
            return health()

        sock = ask(stream=True)
        got = b''
        while b'data: ' not in got:  # the stream has started
            got += sock.recv(4096)
        sock.close()  # gone mid-stream
        status, other = s.post('/v1/completions', dict(prompt='ROMEO', max_tokens=5))  # others go on
        assert status == 200 and len(other['choices'][0]['text']) == 5
        h = settled(1)
        assert h['finished'] == {'cancelled': 1, 'length': 1}, h
        before = h['tokens_generated']
        assert before < 2000, h  # stopped long before its 4,000 tokens

        sock = ask(stream=False)  # a client that waits for the whole answer, then hangs up
        while health()['tokens_generated'] < before + 10:
            time.sleep(0.01)
        sock.close()
        h = settled(2)
        assert h['finished'] == {'cancelled': 2, 'length': 1}, h
        assert h['tokens_generated'] - before < 2000, h
    finally:
        s.stop()


def test_sigterm_stops_the_server_cleanly_and_bad_knobs_are_one_line(run_dir):
    s = Server(f'--out_dir={run_dir}')
    assert s.get('/health')[0] == 200
    code, out, err = s.stop()
    assert code == 0 and 'stopped' in out and 'Traceback' not in err
    r = subprocess.run([sys.executable, 'serve.py', f'--out_dir={run_dir}', '--port=70000'], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == 'error: port must be 0..65535, got 70000'


def test_batched_rows_of_different_lengths_compute_what_each_alone_does():
    """RowCache, one position per row (serve.py's batch), against each row decoded alone."""
    for pos_emb in ('learned', 'rope'):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, pos_emb=pos_emb)).eval()
        prompts = [torch.randint(0, 50, (1, n)) for n in (3, 7, 12)]
        steps = [torch.randint(0, 50, (3, 1)) for _ in range(4)]
        batch = serving.RowCache(2, 32)
        batch.k = [torch.zeros(3, 2, 32, 16) for _ in range(2)]
        batch.v = [torch.zeros(3, 2, 32, 16) for _ in range(2)]
        batch.pos = torch.tensor([3, 7, 12])
        alone = []
        with torch.no_grad():
            for row, p in enumerate(prompts):
                cache = KVCache(2, 32)
                model._hidden(p, cache)
                for layer in range(2):
                    batch.k[layer][row, :, :p.size(1)] = cache.k[layer][0, :, :p.size(1)]
                    batch.v[layer][row, :, :p.size(1)] = cache.v[layer][0, :, :p.size(1)]
                alone.append(cache)
            for tokens in steps:
                together = model._hidden(tokens, batch)[:, -1]
                each = torch.cat([model._hidden(tokens[row:row + 1], alone[row])[:, -1] for row in range(3)])
                torch.testing.assert_close(together, each, atol=1e-5, rtol=0)


def test_engine_batches_every_knob_as_sample_py_decodes_alone(tmp_path):
    """In process: a model with every modern knob away from GPT-2 (from GPTConfig, so a new knob
    joins), the state-carrying ones included (bigram embedding, value embeddings, x0 mix, RoPE),
    decodes three prompts of different lengths together, greedily; each equals sample.py's text
    for it alone."""
    import serve
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'tokenizer': 'char', 'chars': CHARS}))
    torch.manual_seed(0)
    knobs = every_knob(bigram_vocab=97, logit_softcap=15.0)
    assert {'pos_emb': 'rope', 'bigram_vocab': 97, 'value_embeds': True, 'x0_mix': True}.items() <= knobs.items()
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS), **knobs))
    with torch.no_grad():  # parts that start at zero or as the identity get weight, so a mistake shows
        for name, p in model.named_parameters():
            if name.startswith(('bigram.', 'value_embeds.')) or name.endswith('lambdas') or not p.any():
                p.normal_(0.0, 0.5)
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': 'chars', 'data_dir': str(data)}}, tmp_path / 'run' / 'ckpt.pt')
    _, engine, _, max_tokens, _ = serve.load([f'--out_dir={tmp_path / "run"}', '--device=cpu', '--max_batch=4'])

    class Limits:
        max_batch, block_size = 4, 64
    Limits.max_tokens = max_tokens
    prompts = ['ROMEO:', 'the quick brown fox', 'JULIET! over lazy dogs, the']
    p = serving.read_request(json.dumps({'prompt': prompts, 'max_tokens': 25, 'temperature': 0}), Limits)
    generations, _, _ = serving.start_generations(p, engine.tokenizer, engine)
    engine.thread.start()
    try:
        for g in generations:
            assert g.events.get(timeout=120) is not None or g.finish_reason
            while g.events.get(timeout=120) is not None:
                pass
    finally:
        engine.stopping = True
        engine.thread.join(timeout=30)
    assert engine.finished['length'] == 3
    for prompt, g in zip(prompts, generations):
        assert prompt + g.text == sample_py(tmp_path / 'run', f'--start={prompt}', '--max_new_tokens=25',
                                            '--temperature=0')


# -----------------------------------------------------------------------------
# the playground, in Debian's chromium



@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM or '')
def test_the_playground_streams_text_and_draws_attention_in_a_real_browser(server, long_run_dir, tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + '/')
            page.wait_for_function("document.body.dataset.mode === 'completion'", timeout=30000)
            assert page.is_visible('#prompt') and not page.is_visible('#message')  # no chat for this run
            page.fill('#prompt', 'ROMEO:')
            page.fill('#max_tokens', '40')
            page.fill('#seed', '5')
            page.click('#generate')
            # streaming, or already done: 40 tokens may take less than one poll of the page
            page.wait_for_function("['streaming', 'done'].includes(document.body.dataset.state)", timeout=30000)
            page.wait_for_function("document.body.dataset.state === 'done' && document.body.dataset.heatmap",
                                   timeout=60000)
            text = page.inner_text('#output')
            assert text.startswith('ROMEO:') and len(text) > len('ROMEO:')
            layer, head, tokens = page.evaluate("document.body.dataset.heatmap").split(',')
            assert int(tokens) >= 7 and page.locator('#layer option').count() == 2
            assert page.evaluate("document.getElementById('heatmap').width") > 100
            page.select_option('#head', '1')
            assert page.evaluate("document.body.dataset.heatmap").startswith('0,1,')
            page.screenshot(path=str(tmp_path / 'playground.png'))
            assert os.path.getsize(tmp_path / 'playground.png') > 10000
            assert page.inner_text('#status') == 'done (length)'

            long = Server(f'--out_dir={long_run_dir}')  # room for 4,000 tokens: time to press Stop
            try:
                page.goto(long.url + '/')
                page.fill('#max_tokens', '4000')
                page.click('#generate')
                page.wait_for_function("document.getElementById('output').innerText.length > 20", timeout=30000)
                page.click('#stop')
                page.wait_for_function("document.body.dataset.state === 'done'", timeout=30000)
                assert page.inner_text('#status') == 'stopped' and page.is_enabled('#generate')
                health = long.health_when_idle()
                assert health['finished'] == {'cancelled': 1} and health['tokens_generated'] < 4000, health
            finally:
                long.stop()
        finally:
            browser.close()
