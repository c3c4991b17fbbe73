"""Properties of bench.py: the ViT yardstick counts its own FLOPs as torch counts them and matches
a preset's width and half its depth; timing in turns alternates the functions and times each call
alone; the training step clips as training.py does; "% of peak" is 3 x forward FLOPs x img/s over
the peak; the training table and the block table time what they say, and the profile the steps asked for; each
subcommand takes only its options."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import utils
from helpers import NO_COMPILE_OR_TORCHRUN, TORCH_LACKS_COMPILE_AND_TORCHRUN
from mlstm import ViLBlock


def test_vit_flops_formula_matches_torch_flop_counter():
    arch = bench.yardstick_arch("vil-1m")
    vit = bench.bench_model(("vit", arch))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit(torch.randn(1, bench.IN_CHANS, bench.IMG_SIZE, bench.IMG_SIZE))
    assert vit.flops_per_image() == counter.get_total_flops()


def test_yardstick_has_the_preset_width_and_half_its_blocks():
    for preset, blocks in (("vil-1m", 4), ("vil-t", 24)):
        arch = bench.yardstick_arch(preset)
        assert arch["dim"] == 192 and arch["depth"] == blocks // 2 and arch["patch_size"] == 4


def test_block_table_times_a_vil_pair_a_vit_block_a_layer_and_its_pieces(capsys):
    args = argparse.Namespace(model=["vil-1m"], dtype="fp32", batch_size=2, steps=2, warmup=1)
    bench.block_table(args, torch.device("cpu"))
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| vil-1m |")]
    pieces = ["up-projection", "conv + SiLU", "q/k/v and gates", "mLSTM cell (recurrence + norm)",
              "output gate + down-projection"]
    assert [row[1] for row in rows] == ["ViL block pair", "ViT block", "ViL layer"] + [f"ViL layer: {piece}"
                                                                                   for piece in pieces]
    medians = [float(row[2].split()[0]) for row in rows]
    for row, median in zip(rows, medians):  # each ratio is its median over the ViT block's
        assert float(row[3]) == pytest.approx(median / medians[1], abs=0.01 + 0.05 * median / medians[1])
    # that the pieces make up the layer is test_layer_pieces_chained_are_the_layer's (timings are compared
    # in bench.py's output, not here: a test run beside other work would make such an assertion flaky)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_layer_pieces_chained_are_the_layer(dtype):
    # the pieces block_table times, fed each other's outputs, compute ViLLayer.forward; on their own
    # inputs they see the dtypes of the layer's activations under that autocast
    torch.manual_seed(0)
    layer = ViLBlock(32, "top_left", (2, 3)).layer
    x = torch.randn(2, 6, 32)
    with torch.no_grad(), bench.autocast(torch.device("cpu"), dtype):
        x_mlstm, z = layer._up(x)
        x_conv = F.silu(layer._conv(x_mlstm))
        assert torch.equal(layer._out(layer.cell(*layer._qkv_and_gates(x_conv, x_mlstm)), x_conv, z), layer(x))
        outputs = {name: piece() for name, piece in bench.layer_pieces(layer, 2, dtype, torch.device("cpu")).items()}
    q, k, v, igate, fgate = outputs.pop("q/k/v and gates")
    assert igate.dtype == fgate.dtype == torch.float32  # the gate pre-activations, as the cell takes them
    activations = [q, k, v] + [out for outs in outputs.values() for out in outs]
    assert all(out.dtype == (dtype or torch.float32) for out in activations)


def test_timed_in_turns_alternates_the_functions_and_times_each_call_alone(monkeypatch):
    clock, calls = [0.0], []

    def step(name, seconds):  # a fake step: records its call and advances a fake clock
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    seconds = bench.timed_in_turns({"vil": step("vil", 1.0), "vit": step("vit", 10.0)}, steps=3, warmup=2,
                                   device=torch.device("cpu"))
    assert calls == ["vil", "vit"] * 5  # warm-up turns included, in the same alternation
    assert seconds == {"vil": [1.0] * 3, "vit": [10.0] * 3}  # timed turns only, each window its own call


def test_fraction_of_peak_is_three_forward_passes_per_image_over_the_peak():
    assert bench.training_flops_per_image(2e9) == 6e9
    # 6 GFLOP per image x 100 img/s = 0.6 TFLOP/s, over a 1.2 TFLOP/s peak
    assert bench.fraction_of_peak(2e9, 100, 1.2e12) == pytest.approx(0.5)
    assert bench.fraction_of_peak(2e9, 200, 1.2e12) == pytest.approx(2 * bench.fraction_of_peak(2e9, 100, 1.2e12))


def test_matmul_peak_is_a_finite_positive_rate_in_each_dtype():
    for dtype in bench.DTYPES:
        peak = bench.matmul_peak_flops(dtype, torch.device("cpu"), size=64, repeats=2, warmup=1)
        assert math.isfinite(peak) and peak > 0


def test_train_step_clips_the_gradient_norm(monkeypatch):
    monkeypatch.setattr(bench, "GRAD_CLIP", 1e-3)  # far below any gradient norm of a fresh model
    torch.manual_seed(0)
    vit = bench.bench_model(("vit", bench.yardstick_arch("vil-1m")))
    bench.make_train_step(vit, 4, "fp32", torch.device("cpu"))()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in vit.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


# torch.compile's import of torch._dynamo warns of torch.jit's deprecated script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(TORCH_LACKS_COMPILE_AND_TORCHRUN, reason=NO_COMPILE_OR_TORCHRUN)
def test_train_step_decays_the_parameters_that_training_py_decays(monkeypatch):
    import training
    groups_seen, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **options: groups_seen.append(groups) or adamw(groups,
                                                                                                         **options))
    for spec in (("vil", "vil-1m"), ("vit", bench.yardstick_arch("vil-1m"))):
        model = bench.bench_model(spec)
        # compiled, as `--compile` runs it: the wrapper hands param_groups to the model (and compiles nothing yet)
        bench.make_train_step(torch.compile(model), 2, "fp32", torch.device("cpu"))
        decay = {group["weight_decay"] for group in groups_seen[-1] if group["weight_decay"]}
        decayed = {id(p) for group in groups_seen[-1] if group["weight_decay"] for p in group["params"]}
        assert decay == {training.DEFAULTS["weight_decay"]}
        # matrices and kernels, not biases, norms or the position embedding (model.decay_groups)
        assert decayed == {id(p) for name, p in model.named_parameters() if p.ndim >= 2 and name != "pos_embed"}
        assert len(decayed) < len(list(model.parameters()))


def test_training_table_times_a_preset_and_its_vit_as_one_row_pair(capsys, monkeypatch):
    monkeypatch.setattr(bench, "PEAK_MATMUL_SIZE", {"cpu": 256})  # the peak of a small matmul: quick
    args = argparse.Namespace(model=["vil-1m"], dtypes=["fp32"], compile_modes=[False], batch_size=4, steps=2,
                              warmup=1)
    bench.training_table(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "matmul peak" in out and "TFLOP/s" in out
    columns = next(line for line in out.splitlines() if line.startswith("| model |")).strip("| ").split(" | ")
    rows = [dict(zip(columns, line.strip("| ").split(" | "))) for line in out.splitlines()
            if line.startswith("| vit-") or line.startswith("| vil-1m |")]
    assert [row["model"] for row in rows] == ["vit-d192x2", "vil-1m"]
    vit_speed, vil_speed = (float(row["img/s"].split()[0]) for row in rows)
    ratio = float(rows[1]["vs ViT"])
    assert rows[0]["vs ViT"] == "1.00"
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(vil_speed / vit_speed, abs=0.01 + 0.05 * ratio)  # medians rounded in the table
    for row in rows:
        assert float(row["% of peak"].rstrip("%")) > 0 and row["peak memory"].endswith(" MB")
        assert int(row["ops/step"]) > 0


def tf32_matmuls_allowed():
    return torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("device, tf32", [("cpu", False), ("cuda", True)])
def test_a_fresh_process_is_set_up_as_training_py_sets_up_its_own(device, tf32):
    # the rows are timed in spawned interpreters, which do not run bench.py's main: each is set up on its own
    # (TF32 on a GPU, as training.py's float32 runs there; the allocator setting alike, not observable here)
    assert bench.in_fresh_process(device, tf32_matmuls_allowed) is tf32


def test_op_counter_counts_each_operator_once_and_no_views():
    x = torch.randn(4, 4, requires_grad=True)
    with bench.OpCounter() as counter:
        x.t().reshape(2, 8)  # a view, then a copy (the transposed x cannot be viewed so) and a view of it
    assert counter.ops == 1
    with bench.OpCounter() as counter:
        (torch.mm(x, x.t()) + 1).sum()  # mm, add, sum; x.t() a view
    assert counter.ops == 3


def test_each_subcommand_takes_only_its_options(capsys, monkeypatch):
    args = bench.parse_args(["train", "--model", "vil-1m", "--dtypes", "fp32", "--no-compile", "--device", "cpu"])
    assert args.table is bench.training_table and args.dtypes == ["fp32"] and args.compile_modes == [False]
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)  # a CPU without native bf16
    args = bench.parse_args(["data", "--device", "cpu"])
    assert args.table is bench.data_table and args.dtype == "fp32" and args.compile is False
    assert bench.parse_args(["block", "--device", "cpu"]).table is bench.block_table
    # by default the dtypes training.py's --amp auto would train in: bf16 beside fp32 only where it is native
    for native in (False, True):
        monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
        expected = ["fp32", "bf16"] if native else ["fp32"]
        assert bench.parse_args(["train", "--device", "cpu"]).dtypes == expected
        assert bench.parse_args(["forms", "--device", "cpu"]).dtypes == expected
        assert bench.parse_args(["data", "--device", "cpu"]).dtype == expected[-1]
    for argv in (["forms", "--model", "vil-t"], ["data", "--batch-size", "8"], ["block", "--dtypes", "fp32"],
                 ["train", "--steps", "0"], ["train", "--model", "vil-x"], ["train", "--compile", "--warmup", "0"],
                 ["train", "--device", "gpu"], ["data", "--device", "mps"], ["block", "--device", "cpu:abc"],
                 ["forms", "--device", "cpu:1"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2, argv
    with pytest.raises(SystemExit) as exit_info:  # no subcommand: the help, and nothing run
        bench.parse_args([])
    assert exit_info.value.code == 2 and "subcommands" in capsys.readouterr().out


def test_profile_profiles_the_steps_asked_for_after_the_warmup(capsys, monkeypatch):
    calls = []
    make_step = bench.make_train_step

    def counted_step(model, *args):
        step = make_step(model, *args)
        return lambda: (calls.append(type(model).__name__), step())

    monkeypatch.setattr(bench, "make_train_step", counted_step)
    args = bench.parse_args(["profile", "--model", "vil-1m", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                             "--device", "cpu"])
    assert bench.parse_args(["profile"]).steps == 1 and bench.parse_args(["train"]).steps == 10
    args.table(args, torch.device("cpu"))
    assert calls == ["VisionLSTM"] * 3 + ["ViT"] * 3
    out = capsys.readouterr().out
    assert out.count("## Profile of 2 training step(s)") == 2 and "aten::" in out


def test_the_vit_blocks_read_a_token_major_stream():
    # as the ViL's (tests/test_model.py): a strided stream would slow the yardstick's every norm and residual sum
    vit = bench.bench_model(("vit", bench.yardstick_arch("vil-1m")))
    layouts = []
    for block in vit.blocks:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    vit(torch.randn(2, bench.IN_CHANS, bench.IMG_SIZE, bench.IMG_SIZE))
    assert layouts == [True] * len(vit.blocks)
