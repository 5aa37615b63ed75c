"""
serve.py's engine behind FastAPI + uvicorn instead of the standard library's ThreadingHTTPServer:
the alternative measured in dev/LOG.md (the project serves with the standard library; this
file is kept so the comparison can be run again). POST /v1/completions (streamed or whole) and GET /health only,
with serve.py's request checks, engine and knobs.

    pip install fastapi uvicorn
    python dev/serve_fastapi.py --out_dir=out-shakespeare-char-cpu --port=8001
"""

import asyncio
import json
import os
import sys
import time
import uuid
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli  # noqa: E402

hint = "dev/serve_fastapi.py needs FastAPI and uvicorn: pip install fastapi uvicorn"
fastapi = cli.optional_import('fastapi', hint)
uvicorn = cli.optional_import('uvicorn', hint)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

import serve  # noqa: E402
from lib import serving  # noqa: E402


def app_for(engine, name, max_tokens):
    app = fastapi.FastAPI()
    limits = SimpleNamespace(block_size=engine.model.config.block_size, max_tokens=max_tokens,
                             max_batch=engine.max_batch)

    @app.get('/health')
    async def health():
        return {'status': 'ok', 'running': len(engine.rows), 'waiting': engine.pending.qsize(),
                'finished': dict(engine.finished), 'tokens_generated': engine.generated}

    @app.post('/v1/completions')
    async def completions(request: fastapi.Request):
        try:
            p = serving.read_request(await request.body(), limits)
            generations, used, dropped = serving.start_generations(p, engine.tokenizer, engine)
        except serving.RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        head = {'id': f"cmpl-{uuid.uuid4().hex[:24]}", 'object': 'text_completion', 'created': int(time.time()),
                'model': name}

        async def pieces(g):  # the engine thread's queue, read without blocking the event loop
            while (piece := await asyncio.to_thread(g.events.get)) is not None:
                yield piece

        if p['stream']:
            async def events():
                try:
                    for g in generations:
                        async for piece in pieces(g):
                            choice = {'text': piece, 'index': g.index, 'logprobs': None, 'finish_reason': None}
                            yield f"data: {json.dumps(dict(head, choices=[choice]))}\n\n"
                        choice = {'text': '', 'index': g.index, 'logprobs': None, 'finish_reason': g.finish_reason}
                        yield f"data: {json.dumps(dict(head, choices=[choice]))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    for g in generations:
                        g.cancelled.set()
            return StreamingResponse(events(), media_type='text/event-stream')
        for g in generations:
            async for _ in pieces(g):
                pass
        choices = [{'text': g.text, 'index': g.index, 'logprobs': None, 'finish_reason': g.finish_reason}
                   for g in generations]
        completion = sum(len(g.tokens) for g in generations)
        usage = {'prompt_tokens': used * p['n'], 'completion_tokens': completion,
                 'total_tokens': used * p['n'] + completion, 'prompt_tokens_dropped': dropped}
        return dict(head, choices=choices, usage=usage)
    return app


def main(argv):
    cfg, engine, name, max_tokens, info = serve.load(argv)
    engine.thread.start()
    print(f"serving {info['source']} with FastAPI + uvicorn at http://{cfg['host']}:{cfg['port']}", flush=True)
    uvicorn.run(app_for(engine, name, max_tokens), host=cfg['host'], port=cfg['port'], log_level='warning')
    engine.stopping = True


if __name__ == '__main__':
    main(sys.argv[1:])
