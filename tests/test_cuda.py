"""The CUDA paths, where a GPU is present (skipped on CPU-only machines, CI's included): the mLSTM
forms agree with the float64 loop on the GPU, the written-out gradients equal the loop's, the layer is
the design written out, the model runs under bf16 autocast and torch.compile, the loader's batches
are a function of (seed, epoch, step) there too, and training.py runs end to end on cuda."""
import copy
import json

import pytest
import torch

from data import DATASETS, DeviceLoader, augment_recipe
from mlstm import ViLBlock
from model import create_model
from test_mlstm import (FORMS, GRADIENT_REGIMES, assert_parallel_gradient_equals_the_naive_loop_gradient,
                        make_inputs, naive_mlstm, normwise_relative_error)
from test_model import SMALL, reference_layer
from test_training import TINY, run_main, write_folder_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"


@pytest.mark.parametrize("seq_len", [1, 17, 64, 130])
@pytest.mark.parametrize("gate_scale", [1.0, 10.0, 50.0])
def test_forms_match_the_float64_loop_on_cuda(seq_len, gate_scale):
    inputs = make_inputs(seq_len, gate_scale, torch.float32, seed=seq_len + 2000)
    expected = naive_mlstm(*inputs)  # float64 on the CPU, from the same float32 inputs
    for name, form in FORMS.items():
        out = form(*(x.to(DEVICE) for x in inputs))
        assert out.device.type == DEVICE and normwise_relative_error(out.cpu(), expected) <= 1e-4, name


@pytest.mark.parametrize("regime", GRADIENT_REGIMES)
def test_parallel_gradient_on_cuda_equals_the_naive_loop_gradient(regime):
    assert_parallel_gradient_equals_the_naive_loop_gradient(regime, DEVICE)


def test_forms_finite_at_extreme_gates_under_bf16_autocast_on_cuda():
    q, k, v, igate, fgate = make_inputs(37, 1.0, torch.float32, seed=3)
    igate, fgate = 100.0 * igate.sign(), 100.0 * fgate.sign()
    for name, form in FORMS.items():
        leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, igate, fgate)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            h = form(*leaves)
        assert torch.isfinite(h).all(), name
        h.float().square().sum().backward()
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all(), name


@pytest.mark.parametrize("direction", ViLBlock.DIRECTIONS)
def test_layer_on_cuda_matches_the_design_written_out(direction):
    torch.manual_seed(2)
    layer = ViLBlock(64, direction, (3, 4)).double().layer
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    expected = reference_layer(layer, x)  # on the CPU: the reference's loop allocates there
    out = copy.deepcopy(layer).to(DEVICE)(x.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-11)


def test_model_under_bf16_autocast_and_compile_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = create_model("vil-seed", **SMALL).to(DEVICE)
    torch.nn.init.normal_(model.head.weight)  # logits of order 1 (the published init makes them ~1e-4)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=0.1, atol=0.1)  # bf16 rounding
    compiled.float().square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_loader_batches_on_cuda_depend_only_on_seed_epoch_and_step():
    info = DATASETS["cifar10"]
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (96,))

    def batches(seed):
        loader = DeviceLoader(images, labels, 32, num_classes=10, mean=info.mean, std=info.std, train=True,
                              augment=augment_recipe("strong"), seed=seed, device=DEVICE)
        return list(loader.epoch(1))

    first, again, other = batches(0), batches(0), batches(1)
    assert all(x.device.type == DEVICE for x, _ in first)
    for (x, y), (x_again, y_again) in zip(first, again):
        assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not all(torch.equal(x, x_other) for (x, _), (x_other, _) in zip(first, other))


def test_training_runs_end_to_end_on_cuda_with_bf16(tmp_path, capsys):
    data_dir = str(tmp_path / "data")
    write_folder_dataset(data_dir)
    args = [arg if arg != "cpu" else DEVICE for arg in TINY]
    out = tmp_path / "run"
    code, captured = run_main(args + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "2",
                                      "--amp", "bf16"], capsys)
    assert code == 0, captured.err
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_acc"] <= 1.0
