"""dtype='auto' on the CPU: for training, bfloat16 only where the CPU computes it natively (AMX
or AVX512-BF16) and the model is wide enough for it to be faster; for inference (the scripts
that load a run: sample.py, evaluate.py, serve.py) float32 on every CPU, and bfloat16 asked for
converts the weights once instead of autocasting."""


import pytest
import torch

from lib import hardware
from lib import loading, runs
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
    monkeypatch.setattr(hardware, '_printed_device_lines', set())  # an earlier test may have printed them
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


def save_run(folder, width):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=width, block_size=8, vocab_size=11))
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {}}, folder / 'ckpt.pt')
    return folder


@pytest.mark.parametrize('native', ['AMX', 'AVX512-BF16', None])
def test_loading_a_run_for_inference_picks_float32_on_any_cpu(monkeypatch, tmp_path, native):
    """dtype 'auto' where a run is loaded to decode or score: float32 whatever the CPU's bfloat16
    hardware and the model's width, where training (setup_device without inference) would pick
    bfloat16 for the wide model on bfloat16 hardware."""
    monkeypatch.setattr(hardware, 'cpu_bf16', lambda: native)
    for width in (32, 256):
        training = hardware.setup_device('cpu', 'auto', width=width, verbose=False)
        assert training.dtype == ('bfloat16' if native and width >= 192 else 'float32')
        run = save_run(tmp_path / f'run{width}', width)
        loaded, _, dev = loading.load_model_on_device('resume', str(run), 'cpu', 'auto')
        assert (dev.dtype, dev.weights_cast) == ('float32', False)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        assert 'float32 for inference on a CPU' in dev.reason
    with pytest.raises(runs.ConfigError, match="use auto, cpu"):  # a bad device fails before the load
        loading.load_model_on_device('resume', str(tmp_path / 'nowhere'), 'tpu', 'auto')


def test_bfloat16_inference_converts_the_weights_once_and_never_autocasts(tmp_path):
    """dtype bfloat16 asked for at load: every weight is bfloat16, dev.autocast() is not an
    autocast context, and a forward gives bfloat16 logits equal to the converted model's own."""
    run = save_run(tmp_path / 'run', 32)
    loaded, _, dev = loading.load_model_on_device('resume', str(run), 'cpu', 'bfloat16')
    assert dev.dtype == 'bfloat16' and dev.weights_cast and 'no autocast' in dev.reason
    assert all(t.dtype == torch.bfloat16 for t in loaded.state_dict().values() if t.is_floating_point())
    x = torch.randint(0, 11, (2, 8))
    with dev.autocast():
        assert not torch.is_autocast_enabled('cpu')
        logits, _ = loaded(x)
    reference = loading.load_model_on_device('resume', str(run), 'cpu', 'float32')[0].to(torch.bfloat16)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, reference(x)[0])
    # training's bfloat16 keeps float32 weights under autocast
    training = hardware.setup_device('cpu', 'bfloat16', verbose=False)
    with training.autocast():
        assert not training.weights_cast and torch.is_autocast_enabled('cpu')
