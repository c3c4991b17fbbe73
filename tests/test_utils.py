"""Properties of the small helpers: the learning-rate schedule, the weight EMA, atomic files."""
import os

import pytest
import torch

from utils import WeightEMA, atomic_write, learning_rate


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    total, warmup, peak = 100, 10, 2e-3
    rates = [learning_rate(step, total, warmup, peak) for step in range(total)]
    assert rates[:warmup] == pytest.approx([peak * (step + 1) / warmup for step in range(warmup)])
    assert max(rates) == pytest.approx(peak) and rates[warmup] == pytest.approx(peak)
    after = rates[warmup:]
    assert all(later <= earlier for earlier, later in zip(after, after[1:]))
    assert rates[warmup + (total - warmup) // 2] == pytest.approx(peak / 2, rel=0.05)
    assert learning_rate(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)


def test_ema_warms_up_then_follows_the_weights_slowly():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    # first update: decay (1 + 1) / (10 + 1), so the average moves most of the way at once
    start = ema.state_dict()["shadow"]["weight"]
    assert torch.all(start > 0.5)
    for _ in range(5000):
        ema.update(model)
    torch.testing.assert_close(ema.state_dict()["shadow"]["weight"], model.weight.detach())
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    torch.testing.assert_close(copy.weight, model.weight)


def test_ema_state_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    for _ in range(3):
        ema.update(model)
    other = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    for name, value in ema.state_dict()["shadow"].items():
        assert torch.equal(other.state_dict()["shadow"][name], value)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.json"
    path.write_text("old")

    def failing(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), failing)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.json"]  # no temporary file left behind
