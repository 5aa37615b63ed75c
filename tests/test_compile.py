"""torch.compile on the CPU with dropout: it used to crash compiled training in 3 of 5 runs (the
CPU dropout's int16 view of random int64 under inductor). Compiled afresh several times, a
dropout model trains, evaluates at another batch size, and agrees with the eager model."""

import json
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig
from helpers import ENV, REPO, TINY, every_knob, make_dataset

pytestmark = pytest.mark.slow


def test_a_compiled_dropout_model_trains_and_evaluates_again_and_again():
    for attempt in range(3):
        torch._dynamo.reset()  # a fresh compile each time, as in a new process
        torch.manual_seed(attempt)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, dropout=0.2))
        fast = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 64, (4, 32))
        y = torch.roll(x, -1, dims=1)
        for _ in range(3):
            _, loss = fast(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert torch.isfinite(loss)
        with torch.no_grad():
            a, b = fast(x, y)[1], fast(x, y)[1]
            assert a != b  # dropout is on in training mode: two draws differ
            model.eval()
            compiled, eager = fast(x[:2], y[:2])[1], model(x[:2], y[:2])[1]  # another batch size: a recompile
            assert abs(compiled.item() - eager.item()) < 1e-4  # dropout off: the same function
            model.train()


# every model knob away from GPT-2 (from GPTConfig, so a new one joins), and train.py's modern recipe
EVERY_KNOB = [f'--{k}={v}' for k, v in every_knob(logit_softcap=15, bigram_vocab=64).items()] + [
    '--optimizer=muon', '--muon_momentum_warmup=2', '--batch_warmup=2', '--seq_warmup=2', '--embedding_lr=0.02',
    '--scalar_lr=0.02']


@pytest.mark.parametrize('knobs', [[], EVERY_KNOB], ids=['gpt2', 'every-knob'])
def test_train_py_compiles_a_dropout_model_on_the_cpu(tmp_path, knobs):
    """Warmups change the batch's shape: compiled anew, still training."""
    data = make_dataset(tmp_path)
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}', '--device=cpu',
                        '--compile=True', '--dropout=0.2', '--max_iters=4', '--eval_interval=2', *knobs],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [e['iter'] for e in log if e.get('split') == 'val'] == [0, 2, 4]
