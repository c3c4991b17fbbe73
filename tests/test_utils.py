"""Properties of the small helpers: the learning-rate schedule, the weight EMA, atomic files, the allocator
setting."""
import argparse
import errno
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from utils import (UserError, WeightEMA, allow_tf32, atomic_write, counted, error_text, learning_rate,
                   load_checkpoint, save_checkpoint, save_json)


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


def test_ema_copies_integer_buffers_rather_than_averaging_them():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))  # num_batches_tracked: int64
    ema = WeightEMA(model, decay=0.9)
    for _ in range(7):
        model(torch.randn(4, 3))  # in training mode: one more batch tracked
        ema.update(model)
    tracked = ema.state_dict()["shadow"]["1.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and tracked.item() == 7
    assert ema.state_dict()["shadow"]["1.running_mean"].dtype == torch.float32  # floats are averaged
    copy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema.copy_to(copy)
    assert copy[1].num_batches_tracked.item() == 7


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


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask-022", "umask-002", "umask-077"])
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, umask, mode):
    # a data root or run folder shared by a lab stays readable to the others (mkstemp alone gives 0o600)
    previous = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "file.json"), lambda f: f.write(b"{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "file.json").st_mode) == mode


def test_atomic_write_syncs_the_file_then_the_folder_that_holds_its_new_name(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    atomic_write(str(tmp_path / "file.json"), lambda f: f.write(b"{}"))
    assert synced == [False, True]


def test_atomic_write_removes_the_temporary_files_of_killed_writers_of_the_same_path(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    # left by writers killed with SIGKILL: names from tempfile.mkstemp and from atomic_write itself
    killed = [".checkpoint.pt.k3_x9abq.tmp", ".checkpoint.pt.0123abcd.tmp"]
    # temporary files of other paths, and files that are not temporary files, stay
    others = [".checkpoint.pt.best.0123abcd.tmp", ".metrics.json.0123abcd.tmp", "checkpoint.pt.0123abcd.tmp",
              ".checkpoint.pt.notes.tmp"]
    for name in killed + others:
        (tmp_path / name).write_bytes(b"half")
    atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt"] + others)


def test_cpu_native_bf16_is_read_from_torch_cpu_probes_or_else_the_cpu_flags(monkeypatch, tmp_path):
    import utils
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert utils.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert utils.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert utils.cpu_has_native_bf16() is True
    # torch 2.3 has no probes: the flags that Linux lists for the CPU decide, and without them no native bf16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(utils, "CPUINFO", str(cpuinfo))
    for flags, native in [("fpu avx2 fma avx512f", False), ("fpu avx2 avx512f avx512_bf16", True),
                          ("fpu avx2 amx_bf16 amx_tile", True), ("fpu avx2 avx512_bf16_x", False)]:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
                           f"processor\t: 1\nflags\t\t: {flags}\n")
        assert utils.cpu_has_native_bf16() is native, flags
    cpuinfo.unlink()  # no such file (not Linux)
    assert utils.cpu_has_native_bf16() is False


def progress_lines(total, updated_steps):
    import io
    from utils import ProgressBar
    stream = io.StringIO()  # not a terminal, as a log file
    bar = ProgressBar(total, "epoch 1/3", True, stream=stream)
    for done in updated_steps:
        bar.update(done, 0.5, 0.25, 100.0)
    bar.close()
    return stream.getvalue().splitlines()


def test_counts_in_messages_take_the_singular_for_one_only():
    assert [counted(number, "epoch") for number in (0, 1, 2, 50)] == ["0 epochs", "1 epoch", "2 epochs", "50 epochs"]


def test_an_error_text_is_one_line_and_says_where_it_was_cut():
    error = RuntimeError("Error(s) in loading state_dict for VisionLSTM:\n\tsize mismatch for pos_embed: " + "x" * 300)
    text = error_text(error)
    assert "\n" not in text and "\t" not in text and len(text) == 200 and text.endswith("...")
    assert text.startswith("Error(s) in loading state_dict for VisionLSTM: size mismatch for pos_embed")
    assert error_text(ValueError("short")) == "short" and error_text(KeyError()) == "KeyError"


def test_progress_prints_a_plain_line_per_tenth_of_the_epoch_when_not_a_terminal():
    lines = progress_lines(100, range(1, 101))
    assert [line.split()[2] for line in lines] == [f"{10 * tenth}/100" for tenth in range(1, 10)]
    assert all(line.startswith("epoch 1/3 ") and "img/s" in line and "\r" not in line for line in lines)
    # updated only every 20 steps (as on a GPU): a line at each update that crosses a tenth
    assert [line.split()[2] for line in progress_lines(100, range(20, 101, 20))] == \
        ["20/100", "40/100", "60/100", "80/100"]
    # fewer steps than tenths: one line per step but the last (the epoch summary follows it)
    assert len(progress_lines(4, range(1, 5))) == 3


def test_progress_paces_the_time_left_by_the_steps_this_bar_has_seen():
    import io
    import time
    from utils import ProgressBar
    stream = io.StringIO()
    # an epoch resumed after 900 of its 1000 steps, its 901st done in 1 s: 99 steps of 1 s left (1:39), not
    # 99 steps at the pace of 901 done in 1 s (0:00)
    bar = ProgressBar(1000, "epoch 2/3", True, stream=stream, first=900)
    bar.start = time.perf_counter() - 1.0
    bar.update(901, 0.5, 0.25, 100.0)
    minutes, seconds = stream.getvalue().split("left ")[1].split()[0].split(":")
    assert 99 <= 60 * int(minutes) + int(seconds) <= 110  # a loaded machine may take a few ms more


def test_progress_is_silent_on_processes_other_than_the_first():
    import io
    from utils import ProgressBar
    stream = io.StringIO()
    bar = ProgressBar(10, "epoch 1/1", False, stream=stream)
    for done in range(1, 11):
        bar.update(done, 0.5, 0.25, 100.0)
    assert stream.getvalue() == ""


def test_ema_lists_the_model_tensors_once_not_at_every_update():
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)])
    start = model[0].weight.detach().clone()
    ema = WeightEMA(model, decay=0.5)
    calls = []
    real_state_dict = model.state_dict
    model.state_dict = lambda *args, **kwargs: calls.append(1) or real_state_dict(*args, **kwargs)
    for _ in range(10):
        with torch.no_grad():
            model[0].weight.add_(1.0)  # in place, as the optimizer steps: the listed tensors see it
        ema.update(model)
    assert len(calls) == 1  # state_dict() walks every module: once, not at every step
    expected, weights = start.clone(), start.clone()
    for update in range(1, 11):
        weights += 1.0
        decay = min(0.5, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(ema.shadow["0.weight"], expected)
    copy = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]).to(torch.bfloat16)
    ema.copy_to(copy)  # into the copy's own dtype
    assert copy[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(copy[0].weight.float(), ema.shadow["0.weight"], rtol=1e-2, atol=1e-2)


def test_plot_without_matplotlib_is_skipped_with_one_note(tmp_path, monkeypatch, capsys):
    import sys
    import utils
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(utils, "_noted_missing_matplotlib", False)
    history = [dict(epoch=1, train_loss=1.0, train_acc=0.5)]
    for _ in range(3):
        utils.plot_curves(history, str(tmp_path / "curves.png"))
    assert capsys.readouterr().err.count("note: matplotlib is not installed") == 1
    assert not (tmp_path / "curves.png").exists()


def test_distributed_setup_waits_hours_for_process_0_not_the_default_minutes(monkeypatch):
    import datetime
    import utils
    calls = []
    monkeypatch.setattr(utils.dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert utils.setup_distributed("cpu") == (0, 2, torch.device("cpu"))
    assert calls[0][0] == "gloo" and calls[0][1]["timeout"] >= datetime.timedelta(hours=1)


FREE_AND_REALLOCATE = """
import resource, sys
import torch
from utils import keep_freed_memory
applied = keep_freed_memory()
def step():  # a step's activations: allocated and written, then all freed
    blocks = [torch.empty(4 << 20).fill_(1.0) for _ in range(20)]  # 20 x 16 MiB
    del blocks
step(); step(); step()  # the heap settles: the blocks moved once, in the 2nd or 3rd step, in runs here
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step(); step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_freed_activations_are_reused_without_page_faults():
    # in fresh processes (the allocator's state is process-wide): after keep_freed_memory and three
    # steps that settle the heap, three steps that re-allocate the 320 MiB the step before freed find it
    # in the process (0 fresh pages in 24 processes here, torch 2.13 and 2.3.1; before the heap settles,
    # up to 45,056 pages a step under 2.3.1). With glibc's defaults whether that memory goes back to the
    # system varies from process to process (settled, 2 of 8 processes faulted in all 81,888 pages at
    # every step under torch 2.13, 8 of 8 under 2.3.1), so three processes are checked
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = [subprocess.Popen([sys.executable, "-c", FREE_AND_REALLOCATE], cwd=root, stdout=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    results = [process.communicate()[0].split() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    if results[0][0] != "True":
        pytest.skip("mallopt not available (not glibc)")
    pages = 20 * (16 << 20) // 4096
    assert max(int(faults) for _, faults in results) < 3 * pages // 10, results  # over three steps each


def test_a_checkpoint_with_damaged_bytes_is_refused_and_a_folder_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"weight": torch.arange(4096.0)}, "config": {}, "epoch": 1}, path)
    assert torch.equal(load_checkpoint(str(path))["model"]["weight"], torch.arange(4096.0))
    raw = bytearray(path.read_bytes())
    start = raw.index(torch.arange(4096.0).numpy().tobytes()[:64])  # inside the tensor's record
    raw[start + 100:start + 164] = b"\xff" * 64  # NaNs, as the bytes of a disk or copy error might read
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="is damaged: its record .* fails its CRC check"):
        load_checkpoint(str(path))
    with pytest.raises(UserError, match="is a folder: give the checkpoint file in it"):
        load_checkpoint(str(tmp_path))
    # edited by hand into other kinds of values: refused by name, not met later as a TypeError
    for edit in ({"epoch": "1"}, {"model": None}, {"config": []}, {"epoch": -1}, {"epoch": True}):
        save_checkpoint({"model": {}, "config": {}, "epoch": 1, **edit}, path)
        with pytest.raises(UserError, match=r"needs a model \(dict\), config \(dict\), epoch \(int\) of 0 or more"):
            load_checkpoint(str(path))


def test_a_checkpoint_the_system_will_not_let_us_read_is_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path)

    def refused(file, *args, **kwargs):  # what a file of another user's, mode 600, gives (root reads any file)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(UserError, match=r"cannot read checkpoint .*checkpoint.pt \(Permission denied\); make it "
                                        r"readable") as caught:
        load_checkpoint(str(path))
    assert "corrupt" not in str(caught.value)


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "checkpoint.pt"
    weights = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor(7)}
    for checkpoint, named in (({"model": weights}, "weight, b"),
                              ({"model": {}, "ema": {"shadow": weights}}, "EMA weight, b")):
        save_checkpoint({"config": {}, "epoch": 1, **checkpoint}, path)
        with pytest.raises(UserError, match=f"holds a non-finite \\(nan or inf\\) {named};"):
            load_checkpoint(str(path))
    finite = {"a": torch.zeros(3), "steps": torch.tensor(7), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
              "f64": torch.tensor([1e300], dtype=torch.float64)}  # finite, though past float32's range
    save_checkpoint({"model": finite, "ema": None, "config": {}, "epoch": 1}, path)
    assert torch.equal(load_checkpoint(str(path))["model"]["a"], torch.zeros(3))


def test_a_file_that_is_not_plain_tensors_is_refused_without_advice_to_unpickle_it(tmp_path):
    # torch's own message suggests weights_only=False, which would run whatever code the file holds
    pickled = tmp_path / "object.pt"
    torch.save({"model": {}, "config": argparse.Namespace(lr=1.0), "epoch": 1}, pickled)  # a class instance
    text = tmp_path / "notes.pt"
    text.write_text("# not a checkpoint\n")
    greeting = tmp_path / "greeting.pt"  # torch's legacy reader raises a KeyError that names a byte of the file
    greeting.write_text("hello world\n")
    for path in (pickled, text, greeting):
        with pytest.raises(UserError, match="cannot read checkpoint .*: it is truncated, corrupt or not a checkpoint "
                                            "of this project") as caught:
            load_checkpoint(str(path))
        assert "weights_only" not in str(caught.value), str(caught.value)
        assert re.search(r"project \([A-Za-z]+\)$", str(caught.value)), str(caught.value)  # the error's type alone


def test_save_checkpoint_turns_a_failed_write_inside_torch_save_into_an_os_error(tmp_path, monkeypatch):
    def failing(message):
        def save(obj, f):
            raise RuntimeError(message)
        return save

    # torch's zip writer, where the disk fills up part-way (seen on a full tmpfs)
    monkeypatch.setattr(torch, "save", failing("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 8"))
    with pytest.raises(OSError, match="is the disk full"):
        save_checkpoint({}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", failing("some other failure"))  # not a write: raised as it is
    with pytest.raises(RuntimeError, match="some other failure"):
        save_checkpoint({}, tmp_path / "checkpoint.pt")
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_save_json_writes_strict_json_with_null_for_nan_and_infinity(tmp_path):
    import json
    path = tmp_path / "final.json"
    save_json({"test_loss": float("nan"), "curve": [float("inf"), 1.5], "nested": {"x": -float("inf"), "n": 3}}, path)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"test_loss": None, "curve": [None, 1.5],
                                                                   "nested": {"x": None, "n": 3}}


def test_float32_matmuls_use_tf32_on_a_gpu_only():
    before = torch.backends.cuda.matmul.allow_tf32  # a flag of torch's, not an attribute monkeypatch restores
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        allow_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        allow_tf32(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
