"""Properties of bench.py's yardstick and its block timing: the ViT counts its own FLOPs as torch
counts them, matches a preset's width and half its depth, and the block table times what it says."""

import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench


def test_vit_flops_formula_matches_torch_flop_counter():
    arch = bench.yardstick_arch("vil-seed")
    vit = bench.build_model(("vit", arch))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit(torch.randn(1, bench.IN_CHANS, bench.IMG_SIZE, bench.IMG_SIZE))
    assert vit.flops_per_image() == counter.get_total_flops()


def test_yardstick_has_the_preset_width_and_half_its_blocks():
    for preset, blocks in (("vil-seed", 4), ("vil-t", 24)):
        arch = bench.yardstick_arch(preset)
        assert arch["dim"] == 192 and arch["depth"] == blocks // 2 and arch["patch_size"] == 4


def test_block_table_times_a_vil_pair_a_vit_block_and_the_projections(capsys):
    args = argparse.Namespace(model=["vil-seed"], dtypes=["fp32"], batch_size=2, steps=2, warmup=1)
    bench.block_table(args, torch.device("cpu"))
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| vil-seed |")]
    assert [row[1] for row in rows] == ["ViL block pair", "ViT block", "ViL pair: projections only"]
    medians = [float(row[2].split()[0]) for row in rows]
    for row, median in zip(rows, medians):  # each ratio is its median over the ViT block's
        assert float(row[3]) == pytest.approx(median / medians[1], abs=0.01 + 0.05 * median / medians[1])
    # the projections are part of the pair's work
    assert medians[2] < medians[0]
