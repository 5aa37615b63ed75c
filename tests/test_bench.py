"""Tests for bench.py: end to end on a tiny model (seconds), the JSON lines, the comparison table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--vocab_size=64', '--batch_size=2',
        '--burn_in=1', '--num_iters=2', '--repeats=2', '--prompt_len=4', '--max_new_tokens=5',
        '--gen_batch_sizes=[1,3]', '--device=cpu']


def run_bench(*argv):
    r = subprocess.run([sys.executable, str(ROOT / 'bench.py'), *TINY, *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')], r


def test_train_and_generate_emit_json_lines(tmp_path):
    out = tmp_path / 'bench.jsonl'
    results, r = run_bench('--mode=all', f'--json_out={out}')
    assert [(x['bench'], x['batch_size']) for x in results] == [('train', 2), ('generate', 1), ('generate', 3)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    train = results[0]
    assert train['impl'] == 'ours' and train['data'] == 'synthetic random tokens'
    for key in ('ms_per_iter', 'tokens_per_sec', 'peak_memory_mib'):
        assert train[key] > 0, key
    assert train['mfu'] is None and 'MFU n/a' in r.stderr  # no known peak for a CPU
    for gen in results[1:]:
        for key in ('prefill_ms', 'decode_ms_per_token', 'tokens_per_sec', 'total_s'):
            assert gen[key] > 0, key
        assert gen['max_new_tokens'] == 5 and gen['prompt_len'] == 4
    assert 'ours/' not in r.stdout  # no table without a second implementation


def test_real_data_profile_trace_and_errors(tmp_path):
    (np.arange(1000) % 64).astype(np.uint16).tofile(tmp_path / 'train.bin')
    trace = tmp_path / 'trace.json'
    results, _ = run_bench('--mode=train', f'--data_dir={tmp_path}', '--profile=True', f'--trace_file={trace}')
    assert results[0]['data'] == str(tmp_path / 'train.bin')
    assert 'traceEvents' in json.loads(trace.read_text())
    r = subprocess.run([sys.executable, str(ROOT / 'bench.py'), '--mode=fast'], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'mode must be' in r.stderr


def test_comparison_table_lines_up_implementations_and_ratios():
    results = [
        dict(bench='train', impl='ours', batch_size=12, block_size=256, tokens_per_sec=1500.0,
             ran_in='bfloat16 autocast'),
        dict(bench='train', impl='nanogpt', batch_size=12, block_size=256, tokens_per_sec=1000.0,
             ran_in='bfloat16 autocast'),
        dict(bench='generate', impl='ours', batch_size=1, max_new_tokens=100, tokens_per_sec=30.0, ran_in='float32'),
        dict(bench='generate', impl='nanogpt', batch_size=1, max_new_tokens=100, tokens_per_sec=7.5,
             ran_in='float32'),
        dict(bench='generate', impl='hf', batch_size=1, max_new_tokens=100, tokens_per_sec=15.0, ran_in='float32'),
        dict(bench='generate', impl='ours', batch_size=8, max_new_tokens=100, tokens_per_sec=99.0,
             ran_in='float32'),  # alone: no row
    ]
    lines = bench.comparison_table(results).splitlines()
    assert lines[0].split() == ['measurement', 'ours', 'nanoGPT', 'HF', 'cached', 'ours/nanoGPT', 'ours/HF', 'cached']
    assert len(lines) == 4
    assert lines[3] == ('ran in: train ours = bfloat16 autocast; train nanoGPT = bfloat16 autocast; '
                        'generate ours = float32; generate nanoGPT = float32; generate HF cached = float32')
    assert lines[1].split()[-5:] == ['1,500.0', '1,000.0', '-', '1.50x', '-']
    assert lines[2].split()[-5:] == ['30.0', '7.5', '15.0', '4.00x', '2.00x']


def test_int8_generation_runs_in_rounds_beside_ours():
    """--quantize=int8 measures ours and int8 in the same rounds (ours, int8, ours, int8, ...):
    one decode time per round each, and the table lists every round's int8/ours ratio."""
    results, r = run_bench('--mode=generate', '--quantize=int8', '--gen_batch_sizes=[1]', '--repeats=3')
    assert [x['impl'] for x in results] == ['ours', 'int8']
    for x in results:
        assert len(x['decode_ms_all']) == 3 and all(t > 0 for t in x['decode_ms_all'])
        assert x['decode_ms_per_token'] == pytest.approx(sorted(x['decode_ms_all'])[1], abs=1e-3)  # the median
    line = next(line for line in r.stdout.splitlines() if line.startswith('decode int8/ours B=1, per round:'))
    assert len(line.split(':')[1].split('(')[0].split()) == 3
    assert 'int8 weights: ' in r.stdout + r.stderr and 'MiB' in r.stdout + r.stderr
    # the speed-up is against a baseline whose dtype is printed with it
    assert line.endswith('; ours in float32, int8 in int8 weights, float32 elsewhere)'), line
    assert [x['ran_in'] for x in results] == ['float32', 'int8 weights, float32 elsewhere']


@pytest.mark.parametrize('dtype, train, generate', [
    ('auto', 'float32', 'float32'),  # whatever this CPU has: float32 for generation
    ('bfloat16', 'bfloat16 autocast', 'bfloat16 weights'),
])
def test_every_result_names_the_dtype_it_ran_in(dtype, train, generate):
    """Training picks its dtype as train.py does, generation as sample.py does (dtype auto:
    float32 on a CPU; bfloat16: weights converted once): each readable line, JSON line and
    the device lines say which."""
    results, r = run_bench('--mode=all', '--gen_batch_sizes=[1]', f'--dtype={dtype}')
    assert [(x['bench'], x['ran_in']) for x in results] == [('train', train), ('generate', generate)]
    assert results[1]['dtype'] == generate.split()[0]
    if dtype == 'auto':
        assert results[0]['dtype'] in ('float32', 'bfloat16')  # training's auto: the CPU's bfloat16 hardware
        train = 'bfloat16 autocast' if results[0]['dtype'] == 'bfloat16' else 'float32'
        assert results[0]['ran_in'] == train
    lines = r.stderr.splitlines()
    assert any(line.startswith(f'train ours ({train}): ') for line in lines), r.stderr
    assert any(line.startswith(f'generate ours B=1 ({generate}): ') for line in lines), r.stderr
    assert any(line.startswith('generate: device cpu') and f'dtype {generate.split()[0]} (' in line
               for line in r.stdout.splitlines()), r.stdout


@pytest.mark.skipif(not os.environ.get('NANOGPT_DIR'), reason='set NANOGPT_DIR to a nanoGPT checkout to test the comparison')
def test_nanogpt_comparison_runs():
    results, r = run_bench('--mode=all', f"--nanogpt_dir={os.environ['NANOGPT_DIR']}")
    assert {x['impl'] for x in results} == {'ours', 'nanogpt'}
    assert 'ours/nanoGPT' in r.stdout
    assert all(x['tokens_per_sec'] > 0 for x in results)


def test_modern_knobs_run_and_bad_ones_are_refused():
    # RoPE past block_size (the rolling cache), next to nanoGPT's GPT-2 of the same shape
    args = ['--mode=generate', '--max_new_tokens=40', '--gen_batch_sizes=[1]', '--pos_emb=rope', '--qk_norm=True']
    if os.environ.get('NANOGPT_DIR'):
        args.append(f"--nanogpt_dir={os.environ['NANOGPT_DIR']}")
    results, _ = run_bench(*args)
    assert results[0]['impl'] == 'ours' and results[0]['model']['pos_emb'] == 'rope'
    for argv, message in [(['--pos_emb=not-a-scheme'], "error: pos_emb must be one of 'learned', 'rope'"),
                          (['--norm=rmsnorm', '--hf_compare=True'], 'hf_compare needs GPT-2')]:
        r = subprocess.run([sys.executable, str(ROOT / 'bench.py'), *TINY, *argv], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
