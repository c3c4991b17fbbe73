"""The CUDA paths, where a GPU is present (skipped on CPU-only machines, CI's included): the mLSTM
forms agree with the float64 loop on the GPU, the written-out gradients equal the loop's, the layer is
the design written out, the model runs under bf16 autocast and torch.compile, the loader's batches
are a function of (seed, epoch, step) there too, and training.py runs end to end on cuda."""
import copy
import json
import os

# NVIDIA's images set this, which makes cuBLAS use TF32 for float32 matmuls whatever torch is told;
# torch reads it once, at the first matmul, so it is dropped before any test runs. The float32
# checks below compare with float64 to float32 tolerances, which TF32 (10-bit mantissa) fails.
os.environ.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)

import pytest
import torch
import torch.nn.functional as F

import training
from data import DATASETS, Augment, DeviceLoader
from mlstm import ViLBlock, reference_vil_layer
from model import create_model
from utils import stop_requests
from helpers import (FORMS, GRADIENT_REGIMES, NO_COMPILE_OR_TORCHRUN, SMALL, TINY, TORCH_LACKS_COMPILE_AND_TORCHRUN,
                     assert_parallel_gradient_equals_the_naive_loop_gradient, make_inputs, naive_mlstm,
                     normwise_relative_error, run_main, write_folder_dataset)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
EVERY_AUGMENTATION = Augment(crop_padding=4, flip=True, policy="randaugment", erasing_prob=0.25, mixup_alpha=0.8,
                             cutmix_alpha=1.0)


@pytest.fixture(autouse=True)
def full_float32_precision():
    """float32 matmuls and convolutions in full float32 (no TF32) for every test here."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_float32_matmuls_are_not_tf32():
    # a failure here explains every float32 mismatch below: something forces TF32 on
    a, b = (torch.randn(256, 256, dtype=torch.float64) for _ in range(2))
    out = (a.float().to(DEVICE) @ b.float().to(DEVICE)).cpu().double()
    assert normwise_relative_error(out, a @ b) < 1e-5


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
    expected = reference_vil_layer(layer, x)  # on the CPU, in float64
    out = copy.deepcopy(layer).to(DEVICE)(x.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(TORCH_LACKS_COMPILE_AND_TORCHRUN, reason=NO_COMPILE_OR_TORCHRUN)
def test_model_under_bf16_autocast_and_compile_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = create_model("vil-1m", **SMALL).to(DEVICE)
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


@pytest.mark.skipif(TORCH_LACKS_COMPILE_AND_TORCHRUN, reason=NO_COMPILE_OR_TORCHRUN)
def test_compiled_gradients_equal_eager_on_a_preset_width_model():
    # vil-1m at its own width (head width 96: the grouped q/k/v path the presets take), the
    # whole model in one graph, float32: compiled and eager gradients agree to rounding
    torch.manual_seed(0)
    eager = create_model("vil-1m", num_classes=10, img_size=32).to(DEVICE)
    torch.nn.init.normal_(eager.head.weight, std=0.02)
    compiled = copy.deepcopy(eager)
    x = torch.randn(16, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (16,), device=DEVICE)
    F.cross_entropy(eager(x), y).backward()
    F.cross_entropy(torch.compile(compiled, fullgraph=True)(x), y).backward()
    for (name, param), compiled_param in zip(eager.named_parameters(), compiled.parameters()):
        assert normwise_relative_error(compiled_param.grad.cpu(), param.grad.cpu().double()) < 1e-4, name


def test_a_training_step_and_the_loader_never_wait_for_the_gpu(tmp_path):
    # host syncs (.item(), nonzero(), blocking copies) stall the GPU's queue every step; training.py's
    # own step (schedule, bf16 forward, loss, backward, clipping, fused AdamW, EMA) and the loader with
    # every augmentation make none
    data_dir = str(tmp_path / "data")
    write_folder_dataset(data_dir)
    args = [arg if arg != "cpu" else DEVICE for arg in TINY] + [
        "--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--amp", "bf16", "--policy", "randaugment",
        "--flip", "--erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.99"]
    config, given, *_ = training.parse_config(args)
    with stop_requests() as stop:
        folder = training.RunFolder(stop)
        try:
            run = training.setup_run(config, given, False, folder)
            assert run.device.type == DEVICE and run.optimizer.param_groups[0]["fused"] and run.ema is not None
            batches = iter(run.loader.epoch(0))
            training.train_step(run, *next(batches), 0)  # the first step may set things up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                training.train_step(run, *next(batches), 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finally:
            folder.release()


def test_loader_batches_on_cuda_depend_only_on_seed_epoch_and_step():
    info = DATASETS["cifar10"]
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (96,))

    def batches(seed):
        loader = DeviceLoader(images, labels, 32, num_classes=10, mean=info.mean, std=info.std, train=True,
                              augment=EVERY_AUGMENTATION, seed=seed, device=DEVICE)
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
    code, captured = run_main(args + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3",
                                      "--amp", "bf16"], capsys)
    assert code == 0, captured.err
    final = json.loads((out / "final.json").read_text())
    assert final["device"].startswith(DEVICE) and final["autocast"] == "bfloat16"
    assert final["test_acc"] > 0.9  # two brightness classes, as the CPU run of tests/test_training.py


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_cpu_run_resumes_on_cuda_with_the_fused_optimizer_and_any_amp(tmp_path, capsys, amp):
    # the optimizer's step counters move to the GPU for the fused kernel; an fp16 resume of a run
    # saved without a gradient scaler starts a fresh scaler
    data_dir = str(tmp_path / "data")
    write_folder_dataset(data_dir)
    out = tmp_path / "run"
    assert run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"])[0] == 0
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "3", "--device", DEVICE,
                               "--amp", amp], capsys)
    assert code == 0, captured.err
    resumed = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 3 and all(group["fused"] for group in resumed["optimizer"]["param_groups"])
    assert all(float(state["step"]) == 3 * 6 for state in resumed["optimizer"]["state"].values())
    assert bool(resumed["scaler"]) == (amp == "fp16")
    final = json.loads((out / "final.json").read_text())
    assert final["device"].startswith(DEVICE) and final["test_acc"] > 0.9
