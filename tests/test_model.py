"""Properties of the ViL block (mlstm.py) and the model (model.py): shapes and finite gradients on
the image sizes we train on, the traversal directions, presets, errors and optimizer groups."""

import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import NO_COMPILE_OR_TORCHRUN, SMALL, TORCH_LACKS_COMPILE_AND_TORCHRUN, normwise_relative_error
from mlstm import MLSTM_FORMS, BlockDiagonalLinear, ViLBlock, grouped_blocks, reference_vil_layer
from model import PRESETS, ViLConfig, VisionLSTM, create_model


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 3, 32, 48)])
@pytest.mark.parametrize("options", [
    dict(),
    dict(conv_kind="causal1d", pooling="bilateral_avg"),
    dict(mlstm_form="chunkwise", chunk_size=10, drop_path=0.2),
])
def test_forward_backward_finite_on_training_shapes(shape, options):
    batch, chans, height, width = shape
    model = create_model("vil-1m", num_classes=7, in_chans=chans, img_size=(height, width), **SMALL, **options)
    model.train()
    logits = model(torch.randn(shape))
    assert logits.shape == (batch, 7)
    logits.square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_bf16_autocast_forward_backward_finite(form):
    model = create_model("vil-1m", mlstm_form=form, chunk_size=10, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16
    logits.float().square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("conv_kind", ["2d", "causal1d"])
@pytest.mark.parametrize("amp", [False, True])
def test_each_gradient_comes_in_its_parameters_strides(conv_kind, amp):
    # DistributedDataParallel copies each .grad into a bucket laid out as its parameter, and warns ("Grad strides
    # do not match bucket view strides") where the strides differ, those of size-1 dimensions too: a 2-d conv
    # weight laid out (9, 9, 3, 1) got a channels-last (9, 1, 3, 1) gradient
    model = create_model("vil-1m", conv_kind=conv_kind, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(torch.randn(2, 3, 32, 32))
    logits.float().square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad.stride() == param.stride(), name


def test_gradients_reach_the_blocks():
    # the head starts at std 2e-5; the blocks must still receive a (small) gradient
    model = create_model("vil-1m", **SMALL)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, param in model.named_parameters():
        if name.startswith("blocks.") and name.endswith("proj_up.weight"):
            assert param.grad.abs().max() > 0, name


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_model_forms_agree(form):
    torch.manual_seed(0)
    reference = create_model("vil-1m", img_size=(16, 20), **SMALL).double()  # 20 tokens
    other = create_model("vil-1m", img_size=(16, 20), mlstm_form=form, chunk_size=6, **SMALL).double()
    other.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 16, 20, dtype=torch.float64)
    torch.testing.assert_close(other(x), reference(x), rtol=1e-9, atol=1e-15)


PRESET_PARAMS = {"vil-1m": 995_946, "vil-t": 5_846_026, "vil-s": 22_308_682, "vil-b": 87_084_490}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    model = create_model(name, num_classes=10, img_size=32)
    assert model.num_params() == PRESET_PARAMS[name]
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_preset_sizes_match_the_reference_models():
    # the replaced repository's model: ~1.0M; ViL-T ~5.8M at 32 px (6M at 224 px with 196 tokens and 1000 classes)
    assert abs(create_model("vil-1m").num_params() / 1.0e6 - 1) < 0.05
    assert abs(create_model("vil-t").num_params() / 5.8e6 - 1) < 0.02
    assert create_model("vil-1m").config.pooling == "bilateral_concat"


def make_block_pair(patch_grid, conv_kind):
    torch.manual_seed(1)
    forward = ViLBlock(16, "top_left", patch_grid, conv_kind=conv_kind)
    backward = ViLBlock(16, "bottom_right", patch_grid, conv_kind=conv_kind)
    # random skip, gates and biases so that no part of the layer is symmetric by its init
    for param in forward.parameters():
        torch.nn.init.normal_(param, std=0.5)
    backward.load_state_dict(forward.state_dict())
    return forward, backward


@pytest.mark.parametrize("conv_kind", ["2d", "causal1d"])
def test_reversed_block_is_the_flipped_forward_block(conv_kind):
    patch_grid = (3, 5)  # not square: a 180-degree rotation must keep rows and columns apart
    forward, backward = make_block_pair(patch_grid, conv_kind)
    x = torch.randn(2, 15, 16)
    flipped = forward(x.flip(1)).flip(1)
    torch.testing.assert_close(backward(x), flipped, rtol=1e-6, atol=1e-6)
    # same weights, other direction: a different function
    assert (backward(x) - forward(x)).abs().max() > 1e-2


def test_causal_conv_block_reads_only_earlier_tokens():
    forward, backward = make_block_pair((3, 5), "causal1d")
    x = torch.randn(1, 15, 16)
    changed = x.clone()
    changed[:, 7] += 1.0
    assert torch.equal(forward(x)[:, :7], forward(changed)[:, :7])  # top-left reader: tokens before 7 unchanged
    assert torch.equal(backward(x)[:, 8:], backward(changed)[:, 8:])  # bottom-right reader: tokens after 7


def test_2d_conv_sees_the_patch_below():
    # with the 2d conv the top-left reader's first token already sees its grid neighbour below
    forward, _ = make_block_pair((3, 5), "2d")
    x = torch.randn(1, 15, 16)
    changed = x.clone()
    changed[:, 5] += 1.0  # the patch below token 0 on a 3 x 5 grid
    assert not torch.equal(forward(x)[:, 0], forward(changed)[:, 0])
    changed = x.clone()
    changed[:, 10] += 1.0  # two rows below: outside the 3x3 kernel, and later in the sequence
    assert torch.equal(forward(x)[:, 0], forward(changed)[:, 0])


def test_blocks_alternate_direction_and_drop_path_grows_linearly():
    model = create_model("vil-1m", depth=4, drop_path=0.3, dim=16)
    assert [block.direction for block in model.blocks] == ["top_left", "bottom_right"] * 2
    assert [block.drop_path.p for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_only_in_training():
    model = create_model("vil-1m", drop_path=0.5, **SMALL)
    without = create_model("vil-1m", drop_path=0.0, **SMALL)
    without.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), without.eval()
    for seed in range(3):  # in eval no branch is dropped, whatever the random state
        torch.manual_seed(seed)
        assert torch.equal(model(x), without(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_path_zeroes_whole_samples_and_divides_the_kept_ones_by_the_keep_rate(dtype):
    from mlstm import DropPath
    drop = DropPath(0.05).train()
    torch.manual_seed(0)
    x = torch.randn(400, 8, 16).to(dtype)
    out = drop(x)
    assert out.dtype == dtype
    kept = out.flatten(1).ne(0).any(1)
    assert 0 < (~kept).sum() < 60  # about 5% of 400 samples dropped, each whole
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    # kept values are x / 0.95, each rounded in x's dtype: on average no bias, where x times a scale rounded to
    # bf16 (1.0547) would put every kept value 0.2% high
    ratio = out[kept].double() / x[kept].double()
    assert abs(ratio.mean().item() * 0.95 - 1) < 5e-4


def test_model_rebuilds_from_json_config():
    model = create_model("vil-1m", img_size=(28, 28), in_chans=1, **SMALL)
    saved = json.loads(json.dumps(dataclasses.asdict(model.config)))  # img_size comes back as a list
    rebuilt = VisionLSTM(ViLConfig(**saved))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert rebuilt.config == model.config
    assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vil-huge"), "unknown model"),
    (dict(name="vil-t", heads=3), "unknown model option"),
    (dict(name="vil-t", img_size=30), "does not divide"),
    (dict(name="vil-t", img_size=(32, 30)), "does not divide"),
    (dict(name="vil-t", pooling="cls"), "pooling"),
    (dict(name="vil-t", mlstm_form="fast"), "mlstm_form"),
    (dict(name="vil-t", conv_kind="3d"), "conv_kind"),
    (dict(name="vil-t", dim=0), "dim"),
    (dict(name="vil-t", depth=-1), "depth"),
    (dict(name="vil-t", chunk_size=0), "chunk_size"),
    (dict(name="vil-t", drop_path=1.5), "drop_path"),
    (dict(name="vil-t", img_size=(0, 32)), "img_size"),
    (dict(name="vil-t", dim=18), "multiple of qkv_block_size"),  # head width 9, blocks of 4
])
def test_bad_configurations_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


def test_param_groups_cover_every_parameter_once_and_spare_biases_norms_and_embeddings():
    model = create_model("vil-1m", **SMALL)
    decay, no_decay = model.param_groups(weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, param in model.named_parameters():
        spared = (name.endswith("bias") or "norm" in name or name == "pos_embed" or name.endswith(".skip"))
        assert (id(param) in no_decay_ids) == spared, name
    torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)


def test_flops_per_image():
    small, deep = create_model("vil-1m"), create_model("vil-t")
    assert 0 < small.flops_per_image() < deep.flops_per_image()
    # the blocks dominate: 6x the blocks, about 6x the FLOPs
    assert 5.5 < deep.flops_per_image() / small.flops_per_image() < 6.1
    # vil-t at 32 px: ~0.44 G multiply-adds per image (projections ~0.35 G, mLSTM ~0.08 G)
    assert 0.8e9 < deep.flops_per_image() < 1.0e9


@pytest.mark.skipif(TORCH_LACKS_COMPILE_AND_TORCHRUN, reason=NO_COMPILE_OR_TORCHRUN)
def test_model_compiles_without_graph_breaks():
    model = create_model("vil-1m", **SMALL)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("conv_kind", ["2d", "causal1d"])
@pytest.mark.parametrize("direction", ViLBlock.DIRECTIONS)
@pytest.mark.parametrize("dim, proj_bias, norm_bias", [(24, True, True), (64, True, True), (64, False, False)])
def test_layer_matches_the_design_written_out(conv_kind, direction, dim, proj_bias, norm_bias):
    # the layer folds the gate maps through the grouped q/k/v matmuls; the function of the
    # parameters, and so every gradient, must be the one the design writes out. dim 24: head width 12,
    # groups of 12 channels; dim 64: head width 32, groups of 16 (two groups per head)
    torch.manual_seed(2)
    block = ViLBlock(dim, direction, (3, 4), conv_kind=conv_kind, proj_bias=proj_bias, norm_bias=norm_bias)
    layer = block.double().layer
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 12, dim, dtype=torch.float64, requires_grad=True)
    out, expected = layer(x), reference_vil_layer(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    grads = torch.autograd.grad(out, inputs, cotangent)
    expected_grads = torch.autograd.grad(expected, inputs, cotangent)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    # the reference runs the recurrence, the layer the parallel form: their gradients agree to rounding
    # (about 1e-9 norm-wise here, where weights of std 0.5 give large gates); a wrong fold is off by O(1)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert (grad - expected_grad).norm() <= 1e-8 * expected_grad.norm(), name


@pytest.mark.parametrize("dim", [64, 192])
def test_layer_under_bf16_autocast_agrees_with_the_design(dim):
    # under autocast the q/k/v matmuls run in bf16 and in wider groups (group_width_half: 32 channels,
    # one group per head at dim 64, three at dim 192); output and every gradient must stay within bf16
    # rounding (here 0.6-1.6% norm-wise) of the float64 design written out
    torch.manual_seed(2)
    layer = ViLBlock(dim, "top_left", (3, 4)).layer
    assert layer.group_width_half > layer.group_width
    for gate in (layer.cell.igate, layer.cell.fgate):  # zero at init: the gate shares' route would go untested
        torch.nn.init.normal_(gate.weight, std=0.05)
    x = torch.randn(2, 12, dim, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    reference = ViLBlock(dim, "top_left", (3, 4)).layer.double()
    reference.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    expected = reference_vil_layer(reference, x64)
    assert normwise_relative_error(out, expected) <= 2e-2
    cotangent = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out.float(), [x, *layer.parameters()], cotangent.float())
    expected_grads = torch.autograd.grad(expected, [x64, *reference.parameters()], cotangent)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert normwise_relative_error(grad, expected_grad) <= 5e-2, name


def test_block_diagonal_weights_are_the_block_diagonal_matrix():
    torch.manual_seed(4)
    proj = BlockDiagonalLinear(24, 4).double()
    torch.nn.init.normal_(proj.weight)
    dense = proj.dense_weight()  # (out, in)
    for block in range(6):  # block i maps input channels 4i..4i+3 to output channels 4i..4i+3, nothing else
        rows = slice(4 * block, 4 * block + 4)
        assert torch.equal(dense[rows, rows], proj.weight[block])
        assert dense[rows].count_nonzero() == proj.weight[block].count_nonzero()
    for width in (4, 8, 12, 24):  # every group is a diagonal piece of the same matrix
        assert torch.equal(torch.block_diag(*grouped_blocks(proj.weight, width)), dense)


def test_initialisation_follows_the_published_models():
    torch.manual_seed(0)
    model = create_model("vil-1m", num_classes=10, img_size=32, dim=64, depth=4)
    dim = 64
    for block in model.blocks:
        layer, cell = block.layer, block.layer.cell
        # forget gates start near 1 (bias 3..6 over the heads), no dependence on the input yet
        assert torch.all(cell.fgate.weight == 0) and torch.all(cell.igate.weight == 0)
        torch.testing.assert_close(cell.fgate.bias, torch.linspace(3.0, 6.0, cell.num_heads))
        assert torch.all(layer.skip == 1)
        # "small init" std sqrt(2 / (5 D)) for the up-projection; down-projection 2 / sqrt(D)
        assert abs(layer.proj_up.weight.std().item() - (2 / (5 * dim)) ** 0.5) < 0.1 * (2 / (5 * dim)) ** 0.5
        assert abs(layer.proj_down.weight.std().item() - 2 / dim ** 0.5) < 0.1 * 2 / dim ** 0.5
        assert torch.all(layer.proj_up.bias == 0) and torch.all(layer.proj_down.bias == 0)
        assert all(torch.all(proj.bias == 0) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        assert torch.all(cell.norm_weight == 1) and torch.all(cell.norm_bias == 0)
    # q/k/v: the same small init, the model width D (not the inner width 2 D) setting the scale;
    # pooled over the blocks (6144 weights) so that the sample std is within 1% or so
    qkv = torch.cat([proj.weight.flatten() for block in model.blocks
                     for proj in (block.layer.q_proj, block.layer.k_proj, block.layer.v_proj)])
    assert abs(qkv.std().item() - (2 / (5 * dim)) ** 0.5) < 0.04 * (2 / (5 * dim)) ** 0.5
    # input-gate biases N(0, 0.1): 4 heads x 4 blocks of them
    igate_bias = torch.cat([block.layer.cell.igate.bias for block in model.blocks])
    assert 0.05 < igate_bias.std().item() < 0.2 and abs(igate_bias.mean().item()) < 0.1
    assert abs(model.head.weight.std().item() - 2e-5) < 0.2 * 2e-5 and torch.all(model.head.bias == 0)
    assert 0.015 < model.pos_embed.std().item() < 0.025
    assert model.norm.eps == 1e-6
    # down_proj_init="fixed": the down-projection std divided by the number of blocks, 2 / (depth sqrt(D))
    fixed = create_model("vil-1m", num_classes=10, img_size=32, dim=64, depth=4, down_proj_init="fixed")
    for block in fixed.blocks:
        assert abs(block.layer.proj_down.weight.std().item() - 2 / (4 * dim ** 0.5)) < 0.1 * 2 / (4 * dim ** 0.5)


@pytest.mark.parametrize("pooling", ["bilateral_concat", "bilateral_avg"])
def test_pooling_reads_the_first_and_last_token(pooling):
    torch.manual_seed(0)
    model = create_model("vil-1m", num_classes=3, img_size=16, dim=32, depth=2, pooling=pooling).eval()
    tokens = {}
    model.norm.register_forward_hook(lambda module, inputs, output: tokens.update(x=output))
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    normed = tokens["x"]  # (B, S, D) after the final norm
    if pooling == "bilateral_concat":
        pooled = torch.cat([normed[:, 0], normed[:, -1]], dim=-1)
    else:
        pooled = (normed[:, 0] + normed[:, -1]) / 2
    torch.testing.assert_close(logits, model.head(pooled))


@pytest.mark.parametrize("form", MLSTM_FORMS)
def test_forward_and_backward_off_the_cpu_read_nothing_back_from_the_device(form):
    # on a GPU a host read (nonzero, .item(), a branch on tensor values) makes every step wait for the device.
    # The meta device holds no data, so any such read raises there (as the CPU-only per-row choice of the
    # factored parallel form did before it was kept to the CPU)
    model = create_model("vil-1m", drop_path=0.1, mlstm_form=form).to("meta").train()
    logits = model(torch.randn(4, 3, 32, 32, device="meta"))
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device="meta"),
                                             label_smoothing=0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_a_smaller_image_runs_on_its_own_grid_with_the_learned_position_embedding_resized():
    # training.py's --low-res trains early epochs on smaller images: the model at 16 x 24 px (4 x 6 patches) on
    # 8 x 12 px images must be the model built for 8 x 12 px whose position embedding is the learned one resized
    torch.manual_seed(0)
    model = create_model("vil-1m", img_size=(16, 24), **SMALL).double()
    assert model.position_embedding((4, 6)) is model.pos_embed  # at its own size, the learned one itself
    # halving each side, bilinear resizing averages each 2 x 2 block of the learned grid
    table = model.pos_embed.detach().view(4, 6, -1)
    resized = table.view(2, 2, 3, 2, -1).mean(dim=(1, 3)).reshape(1, 6, -1)
    torch.testing.assert_close(model.position_embedding((2, 3)), resized)
    small = create_model("vil-1m", img_size=(8, 12), **SMALL).double()
    small.load_state_dict(dict(model.state_dict(), pos_embed=resized))
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), small(x), rtol=1e-12, atol=1e-12)
    model(x).square().sum().backward()  # a step at the smaller size trains the learned embedding
    assert model.pos_embed.grad.abs().min() > 0
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 10, 12, dtype=torch.float64))


@pytest.mark.parametrize("direction", ViLBlock.DIRECTIONS)
def test_a_layer_given_another_grid_convolves_on_that_grid(direction):
    # a layer built for a 3 x 4 grid, run on 2 x 6 tokens, is the layer built for 2 x 6 (the 2d conv's neighbours
    # are those of the grid given), and the design written out on that grid
    torch.manual_seed(2)
    layer = ViLBlock(24, direction, (3, 4)).double().layer
    other = ViLBlock(24, direction, (2, 6)).double().layer
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x, (2, 6)), other(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x, (2, 6)), reference_vil_layer(layer, x, (2, 6)), rtol=1e-10, atol=1e-12)
    assert (layer(x, (2, 6)) - layer(x)).abs().max() > 1e-3  # the grid matters


def test_under_bf16_autocast_a_layer_casts_each_parameter_once_and_nothing_back_to_float32():
    # each cast is an operator of its own (on a GPU, a kernel launched): a parameter cast for each matmul it enters,
    # or bf16 results cast back to float32 (cat with a float32 piece), would show here
    torch.manual_seed(0)
    layer = ViLBlock(64, "top_left", (3, 4)).layer
    x = torch.randn(2, 12, 64)
    storages = {param.untyped_storage().data_ptr(): name for name, param in layer.named_parameters()}
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten._to_copy:
                casts.append((storages.get(args[0].untyped_storage().data_ptr()), args[0].dtype, out.dtype))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        layer(x)
    cast_params = [name for name, _, _ in casts if name is not None]
    assert len(cast_params) == len(set(cast_params)), cast_params
    assert not [cast for cast in casts if cast[1:] == (torch.bfloat16, torch.float32)], casts


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("side", [32, 16])  # 16: a --low-res image, whose resized position embedding is strided too
def test_the_residual_stream_is_laid_out_token_major(amp, side):
    # the patch embedding's (B, D, S) output, transposed to (B, S, D), is a strided view; summed as it is with the
    # position embedding, its memory order would pass on through every residual sum, each block's norm would copy
    # its input and the sums and their gradients run on strided tensors (a bf16 training step on a CPU 2.6% slower)
    model = create_model("vil-1m", **SMALL).train()
    layouts = []
    for module in (*model.blocks, model.norm):
        module.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        model(torch.randn(2, 3, side, side))
    assert layouts == [True] * (len(model.blocks) + 1)
