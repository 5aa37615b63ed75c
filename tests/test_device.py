"""dtype='auto' on the CPU: bfloat16 only where the CPU computes it natively (AMX or
AVX512-BF16) and the model is wide enough for it to be faster; the scripts that load a run
(sample.py, evaluate.py, serve.py) choose with the loaded model's width."""


import pytest
import torch

from lib import hardware
from lib import runs
from model import GPT, GPTConfig


def test_the_probe_agrees_with_the_kernels_cpu_flags():
    try:
        flags = open('/proc/cpuinfo').read()
    except OSError:
        pytest.skip('no /proc/cpuinfo here')
    want = 'AMX' if ' amx_bf16' in flags else 'AVX512-BF16' if ' avx512_bf16' in flags else None
    assert hardware.cpu_bf16() == want


@pytest.mark.parametrize('native', ['AMX', 'AVX512-BF16', None])
def test_auto_picks_bfloat16_only_with_hardware_and_width(monkeypatch, capsys, native):
    monkeypatch.setattr(hardware, 'cpu_bf16', lambda: native)
    monkeypatch.setattr(hardware, '_printed_device_lines', set())  # each line prints once per process
    low = hardware.CPU_BF16_MIN_WIDTH.get(native, 256)
    wide = hardware.setup_device('cpu', 'auto', width=low)
    narrow = hardware.setup_device('cpu', 'auto', width=low // 2)
    unknown = hardware.setup_device('cpu', 'auto')
    assert wide.dtype == ('bfloat16' if native else 'float32')
    assert narrow.dtype == unknown.dtype == 'float32'
    out = capsys.readouterr().out
    if native:  # the reason names the hardware, the threshold and the model
        assert f"dtype bfloat16 (auto: this CPU has {native}, faster than float32 from {low} wide; this model is {low})" in out
        assert f"bfloat16 is slower below {low} wide; this model is {low // 2}" in out
    else:
        assert "dtype float32 (auto: this CPU has no bfloat16 hardware (AMX or AVX512-BF16))" in out
    # an explicit dtype is honoured everywhere
    assert hardware.setup_device('cpu', 'bfloat16', width=8).dtype == 'bfloat16'
    assert hardware.setup_device('cpu', 'float32', width=4096).dtype == 'float32'


def test_loading_a_run_chooses_with_its_width(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, 'cpu_bf16', lambda: 'AMX')
    for width, want in ((32, 'float32'), (256, 'bfloat16')):
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=width, block_size=8, vocab_size=11))
        run = tmp_path / f'run{width}'
        runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                              'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                              'config': {}}, run / 'ckpt.pt')
        loaded, _, dev = runs.load_model_on_device('resume', str(run), 'cpu', 'auto')
        assert dev.dtype == want and next(loaded.parameters()).dtype == torch.float32  # autocast, f32 weights
    with pytest.raises(runs.ConfigError, match="use auto, cpu"):  # a bad device fails before the load
        runs.load_model_on_device('resume', str(tmp_path / 'nowhere'), 'tpu', 'auto')
