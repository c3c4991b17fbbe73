"""training.py as a user meets it: run folders, exact resume, interruption, NaN stops, clear errors,
evaluation of saved checkpoints and DistributedDataParallel on CPU. Runs use a tiny image-folder
dataset written by the tests and a tiny model, so each takes seconds."""
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import mlstm
import training
import utils
from helpers import NO_COMPILE_OR_TORCHRUN, TINY, TORCH_LACKS_COMPILE_AND_TORCHRUN, run_main, write_folder_dataset
from model import create_model
from utils import format_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder-data"))
    write_folder_dataset(root)
    return root


def run_script(args, cwd=ROOT, **kwargs):
    """training.py in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "training.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, **kwargs)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def test_run_folder_holds_config_metrics_checkpoint_final_and_curves(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3",
                                      "--val-size", "16"], capsys)
    assert code == 0, captured.err
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "folder" and config["epochs"] == 3 and config["model_config"]["dim"] == 32
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2, 3]
    for record in metrics:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_second", "seconds"):
            assert np.isfinite(record[key]), key
        assert "test_acc" not in record  # the test set is not looked at during training
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_acc"] <= 1.0 and final["epochs"] == 3 and final["params"] > 0
    assert final["train_seconds"] > 0 and final["images_per_second"] > 0
    assert final["test_acc"] > 0.9  # two brightness classes are easy to tell apart
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "epoch", "step", "config"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 3
    assert (out / "best.pt").exists()
    assert f"{100 * final['test_acc']:.2f}%" in captured.out and str(out) in captured.out


def full_state(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    optimizer = {f"{index}.{key}": value for index, state in checkpoint["optimizer"]["state"].items()
                 for key, value in state.items()}
    return {**checkpoint["model"], **{f"ema.{k}": v for k, v in checkpoint["ema"]["shadow"].items()},
            **{f"optimizer.{k}": v for k, v in optimizer.items()}}


@pytest.mark.parametrize("stop_at", ["end of epoch 1", "epoch 2, step 3"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(data_dir, tmp_path, monkeypatch, stop_at):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # --low-res: the 3 epochs train at 8, 12 and 16 px, so the stop in epoch 2 falls in a smaller size's third
    common = TINY + ["--data-dir", data_dir, "--drop-path", "0.2", "--ema", "0.9", "--epochs", "3",
                     "--mixup", "0.5", "--erasing", "0.5", "--low-res", "0.5"]
    assert run_main(common + ["--out-dir", str(straight)])[0] == 0
    # Ctrl-C arrives while epoch 1 is written, or during step 3 of epoch 2 (6 steps per epoch)
    real_plot, real_cross_entropy, calls = training.plot_curves, training.F.cross_entropy, []

    def plot_then_interrupt(history, path):
        real_plot(history, path)
        os.kill(os.getpid(), signal.SIGINT)

    def loss_then_interrupt(logits, target, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":
            calls.append(1)
            if len(calls) == 6 + 3:
                os.kill(os.getpid(), signal.SIGINT)
        return real_cross_entropy(logits, target, **kwargs)

    if stop_at == "end of epoch 1":
        monkeypatch.setattr(training, "plot_curves", plot_then_interrupt)
    else:
        monkeypatch.setattr(training.F, "cross_entropy", loss_then_interrupt)
    assert run_main(common + ["--out-dir", str(split)])[0] == 130
    saved = torch.load(split / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["step"]) == ((1, 0) if stop_at == "end of epoch 1" else (1, 3))
    monkeypatch.undo()
    assert run_main(["--resume", "--out-dir", str(split)])[0] == 0
    assert_same_weights(full_state(straight / "checkpoint.pt"), full_state(split / "checkpoint.pt"))
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert json.loads((split / "final.json").read_text())["test_acc"] == \
        json.loads((straight / "final.json").read_text())["test_acc"]


def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(data_dir, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = TINY + ["--data-dir", data_dir, "--epochs", "10", "--limit-train", "64"]
    # both runs in subprocesses with one thread: thread counts change float summation order
    straight_run = run_script(common + ["--out-dir", str(straight)])
    assert straight_run.returncode == 0, straight_run.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "training.py"), *common,
                                "--out-dir", str(stopped)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (stopped / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    assert torch.load(stopped / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] < 10
    resumed = run_script(["--resume", "--out-dir", str(stopped)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(straight / "checkpoint.pt"), weights(stopped / "checkpoint.pt"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "run"
    real_cross_entropy = training.F.cross_entropy
    calls = []

    def poisoned(logits, target, **kwargs):
        loss = real_cross_entropy(logits, target, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training steps, not evaluation
            calls.append(1)
            if len(calls) == 6 + 3:  # epoch 2 (6 steps per epoch), step 3
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training.F, "cross_entropy", poisoned)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3"], capsys)
    assert code == 1
    assert "epoch 2, step 3 of 6" in captured.err and "nan" in captured.err
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert not (out / "final.json").exists()


def test_eval_only_rebuilds_the_model_from_the_checkpoint_and_matches_the_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "2",
                            "--ema", "0.5"], capsys)[0] == 0
    capsys.readouterr()
    code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt"),
                               "--data-dir", data_dir, "--device", "cpu"], capsys)
    assert code == 0, captured.err
    final = json.loads((out / "final.json").read_text())
    result = json.loads((out / "eval-checkpoint.json").read_text())
    assert result["test_acc"] == pytest.approx(final["test_acc"])
    assert f"{100 * final['test_acc']:.2f}%" in captured.out and "note:" not in captured.out
    # settings of a run have no say in its evaluation: named, and the result is the same
    code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir,
                               "--batch-size", "3", "--drop-path", "0.5"], capsys)
    assert code == 0, captured.err
    assert "ignoring --batch-size, --drop-path" in captured.out
    assert json.loads((out / "eval-checkpoint.json").read_text())["test_acc"] == result["test_acc"]


def test_checkpoint_without_eval_only_and_eval_only_with_resume_are_refused(trained_run, capsys):
    # each would otherwise silently ignore a flag (a fresh run beside --checkpoint, say)
    checkpoint = str(trained_run / "checkpoint.pt")
    for args, message in (([], "--checkpoint names the file for --eval-only"),
                          (["--eval-only", "--resume", "--out-dir", str(trained_run)], "exclude each other")):
        code, captured = run_main(["--checkpoint", checkpoint, *args], capsys)
        assert code == 2 and message in captured.err, captured.err


def test_a_new_run_never_overwrites_an_existing_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"])[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2 and "--resume" in captured.err
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--model", "vil-xxl"], "--model"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--patch-size", "5"], "patch"),
    (["--batch-size", "4096"], "--batch-size"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--amp", "fp16"], "fp16"),
])
def test_bad_flags_give_a_clear_error_and_exit_2(data_dir, tmp_path, capsys, args, message):
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"),
                                      "--epochs", "1"] + args, capsys)
    assert code == 2
    # the last line is the error (before it, at most the notes of a first decoding of the folder)
    assert captured.err.splitlines()[-1].startswith("error:") and message in captured.err.splitlines()[-1]


def test_user_errors_exit_non_zero_without_a_traceback(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    corrupt = tmp_path / "corrupt-data"
    write_folder_dataset(str(corrupt), train_per_class=2, test_per_class=1)
    (corrupt / "train" / "dark" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases = [
        (TINY + ["--data-dir", data_dir, "--out-dir", str(blocker / "run"), "--epochs", "1"], "--out-dir"),
        (TINY + ["--data-dir", str(tmp_path / "nothing-here"), "--out-dir", str(tmp_path / "r1")], "nothing-here"),
        (TINY + ["--data-dir", str(corrupt), "--out-dir", str(tmp_path / "r2")], "0.png"),
        (["--eval-only", "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--eval-only", "--checkpoint", str(garbage)], "garbage.pt"),
        (["--resume", "--out-dir", str(tmp_path / "no-run")], "checkpoint"),
    ]
    for args, message in cases:
        result = run_script(args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and message in result.stderr, (args, result.stderr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk: Linux")
def test_a_first_checkpoint_that_cannot_be_written_leaves_no_run_file_and_the_same_command_starts_again(
        data_dir, tmp_path):
    import resource
    for train in (True, False):  # the decoded images cached first, so that the run below writes only its own files
        training.load_dataset("folder", data_dir, train=train, image_size=16)
    args = TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "again"), "--epochs", "1"]
    # every file this process writes stops at 20 kB, as on a full disk (Python ignores SIGXFSZ: the write fails)
    full = run_script(args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.splitlines()[-1].startswith("error: cannot write ") and "nothing was saved" in full.stderr
    assert sorted(os.listdir(tmp_path / "again")) == [".lock"]  # no config.json claims the folder
    assert run_script(args).returncode == 0


def test_a_checkpoint_write_failing_inside_torch_save_is_a_clear_error(data_dir, tmp_path, capsys, monkeypatch):
    # where the disk fills up part-way, torch's zip writer raises a RuntimeError, not an OSError (seen on a tmpfs)
    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 200576 vs 200468")

    for train in (True, False):  # the decoded images cached first: the patch below is for the checkpoint
        training.load_dataset("folder", data_dir, train=train, image_size=16)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2
    assert captured.err.splitlines()[-1].startswith(f"error: cannot write {out / 'checkpoint.pt'} (the write failed: "
                                                    f"is the disk full?")
    assert sorted(os.listdir(out)) == [".lock"]


def test_an_epoch_whose_metrics_line_was_not_written_gets_it_back_from_its_checkpoint_on_resume(
        data_dir, tmp_path, capsys, monkeypatch):
    out, stopped = tmp_path / "run", tmp_path / "stopped"
    args = TINY + ["--data-dir", data_dir, "--epochs", "2", "--val-size", "16"]
    assert run_main(args + ["--out-dir", str(out)], capsys)[0] == 0
    whole = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the same run stopped after epoch 1's checkpoint: its config.json write failed (a full disk), before
    # metrics.jsonl got the epoch's line
    save_json = training.save_json

    def disk_full_at_config(obj, path):
        if os.path.basename(path) == "config.json":
            raise OSError(28, "No space left on device")
        save_json(obj, path)

    monkeypatch.setattr(training, "save_json", disk_full_at_config)
    code, captured = run_main(args + ["--out-dir", str(stopped)], capsys)
    assert code == 2 and "(epoch 1) is intact" in captured.err
    assert not (stopped / "metrics.jsonl").exists() and (stopped / "best.pt").exists()
    monkeypatch.undo()
    assert run_main(["--resume", "--out-dir", str(stopped)], capsys)[0] == 0
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in resumed] == [1, 2]
    for key in ("train_loss", "val_acc", "lr"):
        assert [line[key] for line in resumed] == pytest.approx([line[key] for line in whole]), key


def test_running_out_of_memory_says_so_and_keeps_the_last_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"]
    assert run_main(args, capsys)[0] == 0
    saved = (out / "checkpoint.pt").read_bytes()

    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(training, "train_step", no_memory)
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 1
    message = captured.err.splitlines()[-1]
    assert message.startswith("error: out of memory (") and "A new run needs less with a smaller --batch-size" in \
        message and "(epoch 1) is intact" in message and "--resume" not in message  # it keeps its batch size
    assert (out / "checkpoint.pt").read_bytes() == saved
    def bug(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(training, "train_step", bug)  # any other RuntimeError is a programming error: raised
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)


def test_paths_that_are_not_what_the_flag_needs_are_named_with_what_to_do(data_dir, trained_run, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = TINY + ["--epochs", "1"]
    cases = [
        (base + ["--dataset", "mnist", "--data-dir", str(a_file), "--out-dir", str(tmp_path / "r1")],
         "(it is a file, not a folder); point --data-dir"),
        (base + ["--data-dir", data_dir, "--out-dir", str(a_file)], "(it is a file, not a folder); choose another"),
        (["--resume", "--out-dir", str(a_file)], "it is a file, not a folder"),
        (["--resume", "--out-dir", str(empty)], "it has no checkpoint.pt"),
        (["--eval-only", "--checkpoint", str(trained_run)], "is a folder: give the checkpoint file in it"),
        (base + ["--data-dir", "", "--out-dir", str(tmp_path / "r2")], "--data-dir is empty"),
        (base + ["--data-dir", data_dir, "--out-dir", ""], "--out-dir is empty"),
        (base + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "r3"), "--device", "cpu:1"],
         "the CPU is one device"),
    ]
    for args, message in cases:
        code, captured = run_main(args, capsys)
        assert code == 2 and message in captured.err.splitlines()[-1], (args, captured.err)


@pytest.mark.skipif(TORCH_LACKS_COMPILE_AND_TORCHRUN, reason=NO_COMPILE_OR_TORCHRUN)
def test_two_processes_with_gloo_match_one_process_on_the_same_global_batch(data_dir, tmp_path):
    common = TINY + ["--data-dir", data_dir, "--epochs", "4", "--crop-padding", "0", "--ema", "0.9"]
    single = run_script(common + ["--out-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(ROOT, "training.py"), *common,
                             "--out-dir", str(tmp_path / "two"), "--time-budget", "1e6"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    # the EMA too: every process starts from the same initial weights
    one, two = full_state(tmp_path / "one" / "checkpoint.pt"), full_state(tmp_path / "two" / "checkpoint.pt")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    final_one = json.loads((tmp_path / "one" / "final.json").read_text())
    final_two = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final_two["world_size"] == 2
    # the budget's timed steps and its refits after epochs 1 and 2 (the first half) run on every process (their
    # all-reduces pair up: a process that refitted alone would hang or fail) and leave the weights as they were
    config_two = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config_two["epochs"] == 4 and config_two["time_budget_fit"]["epochs_asked"] == 4
    assert [refit["epoch"] for refit in config_two["time_budget_fit"]["refits"]] == [1, 2]
    assert final_two["test_acc"] == pytest.approx(final_one["test_acc"], abs=1 / 32)


def test_limit_train_on_a_folder_keeps_every_class(data_dir, tmp_path, capsys):
    # folder images come sorted by class (48 per class here), so the first 32 are all of class 0
    def limited(seed):
        config = training.parse_config(TINY + ["--data-dir", data_dir, "--limit-train", "32", "--seed", seed])[0]
        return training.load_splits(config, 0, 1, torch.device("cpu"), None)[:2]

    images, labels = limited("3")
    whole_images, whole_labels = training.load_splits(
        training.parse_config(TINY + ["--data-dir", data_dir])[0], 0, 1, torch.device("cpu"), None)[:2]
    assert len(labels) == 32 and torch.bincount(labels).min() >= 8  # both classes, not 32 of one
    assert torch.equal(labels, labels.sort().values)  # a subset in the split's (class-sorted) order
    rows = [next(i for i in range(len(whole_images)) if torch.equal(whole_images[i], image)) for image in images]
    assert torch.equal(whole_labels[rows], labels)  # each image kept with its own label
    assert torch.equal(limited("3")[1], labels) and torch.equal(limited("3")[0], images)  # seeded
    assert not torch.equal(limited("4")[0], images)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1",
                                      "--limit-train", "32"], capsys)
    assert code == 0, captured.err
    assert json.loads((out / "config.json").read_text())["num_classes"] == 2
    assert json.loads((out / "config.json").read_text())["model_config"]["img_size"] == [16, 16]


def test_amp_auto_is_bf16_on_a_cpu_with_native_bf16_and_float32_on_one_without(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert training.autocast_dtype("auto", cpu) == torch.bfloat16
    assert training.autocast_dtype("off", cpu) is None
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert training.autocast_dtype("auto", cpu) is None
    assert training.autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for: granted (emulated)


def tiny_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def test_tta_logits_are_the_mean_of_the_image_and_its_mirror_image():
    model = tiny_classifier()
    x = torch.randn(5, 3, 8, 8)
    expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    assert torch.allclose(training.predict(model, x, tta=True), expected, atol=1e-6)
    assert torch.equal(training.predict(model, x, tta=False), model(x))
    # a model that is not mirror-symmetric gives different logits with and without it
    assert not torch.allclose(training.predict(model, x, tta=True), model(x))


def test_evaluate_without_tta_scores_the_plain_logits_and_with_it_the_mirrored_mean():
    model = tiny_classifier()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    config = dict(num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = (images.float() / 255 - 0.5) / 0.25
    for tta in (False, True):
        logits = training.predict(model, x, tta)
        loss, accuracy = training.evaluate(model, images, labels, config, torch.device("cpu"), None,
                                           0, 1, None, tta=tta)
        assert accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_shifted_moves_the_content_and_fills_the_uncovered_border():
    x = torch.randn(2, 3, 6, 7)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)  # black in each normalised channel
    moved = training.shifted(x, 1, -2, fill)  # one pixel down, two left
    assert moved.shape == x.shape
    assert torch.equal(moved[..., 1:, :-2], x[..., :-1, 2:])
    border = torch.ones(6, 7, dtype=torch.bool)
    border[1:, :-2] = False
    assert torch.equal(moved[..., border], fill.view(1, 3, 1).expand(2, 3, int(border.sum())))
    assert torch.equal(training.shifted(x, 0, 0, fill), x)
    assert torch.equal(training.shifted(x, 0, 9, fill), fill.expand_as(x))  # moved out of view


def test_tta_shift_logits_are_the_mean_over_the_shifted_views_and_their_mirror_images():
    model = tiny_classifier()
    x, fill = torch.randn(5, 3, 8, 8), torch.tensor([0.5, -0.5, 1.0]).view(1, 3, 1, 1)

    def moved(dy, dx):  # the image rolled by (dy, dx), the pixels that wrapped around set to the fill
        rows, cols = torch.arange(8).view(8, 1) - dy, torch.arange(8).view(1, 8) - dx  # where each pixel came from
        inside = (rows >= 0) & (rows < 8) & (cols >= 0) & (cols < 8)
        return torch.where(inside, x.roll((dy, dx), dims=(-2, -1)), fill)

    views = [x] + [moved(dy, dx) for dy, dx in ((0, 2), (0, -2), (2, 0), (-2, 0))]
    plain = torch.stack([model(view) for view in views]).mean(0)
    mirrored = torch.stack([model(view) for view in views] + [model(view.flip(-1)) for view in views]).mean(0)
    assert torch.allclose(training.predict(model, x, tta=False, shift=2, fill=fill), plain, atol=1e-6)
    assert torch.allclose(training.predict(model, x, tta=True, shift=2, fill=fill), mirrored, atol=1e-6)
    # no shift: the mirror pair alone, as before --tta-shift
    assert torch.equal(training.predict(model, x, tta=True, shift=0, fill=fill), training.predict(model, x, True))
    assert not torch.allclose(mirrored, training.predict(model, x, True))


def test_tta_shift_scores_the_final_evaluation_and_eval_only_not_the_epochs(data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    shifts, predict = [], training.predict

    def recording_predict(model, x, tta, shift=0, fill=0.0):
        shifts.append(shift)
        return predict(model, x, tta, shift, fill)

    monkeypatch.setattr(training, "predict", recording_predict)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "2",
                                      "--val-size", "16", "--tta-shift", "2"], capsys)
    assert code == 0, captured.err
    epochs = len(shifts) - 1  # one batch a split here: the validation after each epoch, then the test set
    assert epochs == 2 and shifts == [0, 0, 2]
    final = json.loads((out / "final.json").read_text())
    assert final["tta_shift"] == 2 and "mean of 5 views" in captured.out  # --no-flip: no mirror images
    # --eval-only scores the checkpoint as the run's end did, and without the shifts when told
    capsys.readouterr()
    evaluated = {}
    for extra in ([], ["--tta-shift", "0"]):
        code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir]
                                  + extra, capsys)
        assert code == 0, captured.err
        evaluated[tuple(extra)] = json.loads((out / "eval-checkpoint.json").read_text())
    assert shifts[-2:] == [2, 0]
    assert evaluated[()]["test_acc"] == pytest.approx(final["test_acc"])
    assert evaluated[()]["test_loss"] == pytest.approx(final["test_loss"])
    assert evaluated[("--tta-shift", "0")]["test_loss"] != pytest.approx(final["test_loss"])


def test_tta_and_flips_only_where_training_flips():
    cifar, mnist = dict(tta=True, flip=True, dataset="cifar10"), dict(tta=True, flip=True, dataset="mnist")
    assert training.mirror_tta(cifar) and training.random_flips(cifar)
    assert training.make_augment(dict(training.DEFAULTS, **cifar)).flip
    # digits are never mirrored, whatever the flags say
    assert not training.mirror_tta(mnist) and not training.random_flips(mnist)
    assert not training.make_augment(dict(training.DEFAULTS, **mnist)).flip
    assert not training.mirror_tta(dict(cifar, flip=False))
    assert not training.mirror_tta(dict(cifar, tta=False))
    assert not training.mirror_tta(dict(flip=True, dataset="cifar10"))  # a checkpoint from before --tta


def test_progress_lines_reach_a_log_file(data_dir, tmp_path):
    result = run_script(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch 1/1 ")]
    assert progress and all("img/s" in line for line in progress), result.stderr


def test_the_final_evaluation_and_eval_only_print_progress_lines_and_the_epochs_do_not(data_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(training, "EVAL_BATCH_SIZE", 4)  # 32 test images: 8 batches, a line after each but the last
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "2",
                                      "--val-size", "16", "--tta-shift", "2"], capsys)
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("test")]
    assert [line.split()[6] for line in lines] == [f"{batch}/8" for batch in range(1, 8)], captured.err
    assert all(line.startswith("test, mean of 5 views, batch ") and "img/s" in line for line in lines)
    assert "batch 1/4" not in captured.err  # the validation after each epoch (16 images) stays silent
    assert "(loss " in captured.out and "mean of 5 views) after 2 epochs, 0:" in captured.out, captured.out
    code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir],
                              capsys)
    assert code == 0, captured.err
    assert [line.split()[6] for line in captured.err.splitlines() if line.startswith("test, mean of 5 views")] == \
        [f"{batch}/8" for batch in range(1, 8)], captured.err


# The flags: one table (training.FLAGS), from which the command line, its checks, --help and
# README.md's "Flags" follow.
FLAGS = {name: flag for flags in training.FLAGS.values() for name, flag in flags.items()}
FLOAT_FLAGS = [name for name, flag in FLAGS.items() if flag.type is float]
RANGED_FLAGS = [name for name, flag in FLAGS.items() if isinstance(flag.allowed, str)]
SAVED_RUN_FLAGS = ["resume", "eval-only", "checkpoint"]  # what to do, not settings of a run


def option(name):
    return "--" + name.replace("_", "-")


def refusal(args):
    """The message of the UserError that parse_config raises for args; None when it accepts them."""
    try:
        config = training.parse_config(list(args))[0]
    except training.UserError as error:
        return str(error)
    json.dumps(config, allow_nan=False)  # an accepted configuration is plain JSON: no NaN, no inf
    return None


def ends(flag):
    """The values next to each end of flag's range: (lowest allowed, highest allowed), (nearest
    refused below, nearest refused above)."""
    low, high, low_included, high_included = flag.interval()
    if flag.type is int:
        down, up = (lambda x: x - 1), (lambda x: x + 1)
    else:
        down, up = (lambda x: math.nextafter(x, -math.inf)), (lambda x: math.nextafter(x, math.inf))
    inside = (low if low_included else up(low), high if high_included else down(high))
    outside = (down(low) if low_included else low, up(high) if high_included else high)
    return inside, outside


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_every_float_flag_refuses_nan_and_inf_by_name_and_writes_nothing(data_dir, tmp_path, capsys, name, value):
    out = tmp_path / "run"
    # --flag=-inf: argparse takes a lone -inf for a flag of its own
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1",
                                      f"{option(name)}={value}"], capsys)
    assert code == 2, captured.err
    assert captured.err.startswith(f"error: {option(name)} must be a finite number in "), captured.err
    assert captured.err.rstrip().endswith(f"got {value}"), captured.err
    assert not out.exists()  # so no config.json with a NaN in it


@pytest.mark.parametrize("name", RANGED_FLAGS)
def test_each_range_accepts_its_ends_and_refuses_the_nearest_values_outside(name):
    flag = FLAGS[name]
    inside, outside = ends(flag)
    for value in inside:
        assert refusal([f"{option(name)}={value!r}"]) is None, (name, value)
    kind = "an integer" if flag.type is int else "a finite number"
    for value in outside:
        assert refusal([f"{option(name)}={value!r}"]) == \
            f"{option(name)} must be {kind} in {flag.allowed}, got {value!r}"


def test_a_seed_beyond_64_bits_is_refused(data_dir, tmp_path, capsys):
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"),
                                      "--seed", str(2**64)], capsys)
    assert code == 2 and captured.err.startswith("error: --seed must be an integer in "), captured.err
    assert refusal(["--seed", str(2**63 - 1)]) is None


@pytest.mark.parametrize("name", ["crop_padding", "policy_ops", "policy_magnitude", "erasing", "mixup", "cutmix"])
def test_augmentation_ranges_agree_with_data_augment(name):
    inside, outside = ends(FLAGS[name])
    for value in inside:  # what the table allows, data.Augment builds
        config = dict(training.DEFAULTS, policy="randaugment", **{name: value})
        training.check_config(config)
        training.make_augment(config)
    # below the range both refuse, the table first, with the flag's name instead of a dataclass repr
    config = dict(training.DEFAULTS, policy="randaugment", **{name: outside[0]})
    with pytest.raises(training.UserError, match=f"^{option(name)} must be"):
        training.check_config(config)
    with pytest.raises(training.UserError, match="bad augmentation flags"):
        training.make_augment(config)


def test_erasing_always_and_no_policy_operations_as_data_augment_says():
    assert refusal(["--erasing", "1.0"]) is None  # erase every image: data.Augment allows it
    assert refusal(["--policy-ops", "0"]) == \
        f"--policy-ops must be an integer in [1, {len(training.POLICY_OPS)}], got 0"
    for policy in FLAGS["policy"].allowed:
        assert training.make_augment(dict(training.DEFAULTS, policy=policy)).policy == policy


def test_model_flags_agree_with_the_model():
    for value in ends(FLAGS["drop_path"])[0]:
        training.ViLConfig(drop_path=value)
    with pytest.raises(ValueError):
        training.ViLConfig(drop_path=ends(FLAGS["drop_path"])[1][1])
    for name in ("pooling", "conv_kind", "mlstm_form"):  # ViLConfig's fields of the same names
        for value in FLAGS[name].allowed:
            assert getattr(training.ViLConfig(**{name: value}), name) == value
    label_smoothing = ends(FLAGS["label_smoothing"])[0][1]
    torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), label_smoothing=label_smoothing)


@pytest.mark.parametrize("args", [["--image-size", "100000"], ["--pad-to", "100000"], ["--dim", "1000000"],
                                  ["--depth", "100000"], ["--crop-padding", "100000"],
                                  ["--batch-size", str(2**40)]])
def test_huge_sizes_are_refused_before_any_data_is_loaded_or_model_built(data_dir, tmp_path, capsys,
                                                                        monkeypatch, args):
    def must_not_be_reached(*args, **kwargs):
        raise AssertionError("the run went on to load data or build the model")

    monkeypatch.setattr(training, "load_dataset", must_not_be_reached)
    monkeypatch.setattr(training, "VisionLSTM", must_not_be_reached)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run")] + args, capsys)
    assert code == 2 and captured.err.startswith(f"error: {args[0]} must be an integer in "), captured.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, args, message", [
    ("folder", ["--dim", "36"], "choose a dim that is a multiple of 8"),  # within --dim's range
    ("folder", ["--patch-size", "5"], "patch_size 5 does not divide the image size 16x16"),  # --image-size 16
    ("cifar", ["--patch-size", "3"], "patch_size 3 does not divide the image size 32x32"),
    ("mnist", ["--patch-size", "8", "--pad-to", "0"], "patch_size 8 does not divide the image size 28x28"),
])
def test_model_flags_that_make_no_model_are_refused_before_any_data_is_loaded(tmp_path, capsys, monkeypatch,
                                                                              dataset, args, message):
    # a wrong --dim or --patch-size is known from the flags and the dataset alone: no download or decoding first
    def must_not_be_reached(*args, **kwargs):
        raise AssertionError("the run went on to load data or build the model")

    monkeypatch.setattr(training, "load_dataset", must_not_be_reached)
    monkeypatch.setattr(training, "VisionLSTM", must_not_be_reached)
    code, captured = run_main(TINY + ["--dataset", dataset, "--data-dir", str(tmp_path / "data"),
                                      "--out-dir", str(tmp_path / "run")] + args, capsys)
    assert code == 2 and captured.err.startswith("error: cannot build the model: "), captured.err
    assert message in captured.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_flags_given_that_change_nothing_in_the_run_are_named():
    def unused(*argv):
        config, given = training.parse_config(list(argv))[:2]
        return training.flags_without_effect(config, given, training.check_model_flags(config))

    assert unused("--dataset", "mnist", "--chunk-size", "16", "--image-size", "48", "--flip", "--tta") == [
        "--chunk-size 16 (for --mlstm-form chunkwise)", "--image-size 48 (for image folders)",
        "--flip (for datasets other than hand-written digits)", "--tta (for runs that train with random flips)"]
    assert unused("--dataset", "cifar", "--pad-to", "40", "--policy", "none", "--policy-ops", "3",
                  "--policy-magnitude", "5") == ["--pad-to 40 (for 28-px MNIST and Fashion-MNIST)",
                                                 "--policy-ops 3 (for --policy randaugment)",
                                                 "--policy-magnitude 5 (for --policy randaugment or trivialaugment)"]
    assert unused("--dataset", "cifar", "--policy", "trivialaugment", "--policy-ops", "3") == [
        "--policy-ops 3 (for --policy randaugment)"]
    assert unused("--dataset", "folder", "--image-size", "4", "--patch-size", "4", "--low-res", "0.5") == [
        "--low-res 0.5 (for images more than one patch a side, in runs of more than one epoch)"]
    assert unused("--dataset", "folder", "--image-size", "8", "--patch-size", "4", "--low-res", "0.5",
                  "--epochs", "1") == ["--low-res 0.5 (for images more than one patch a side, in runs of more "
                                       "than one epoch)"]
    # where they act, no note: the same flags in the runs they are for
    assert unused("--dataset", "folder", "--image-size", "8", "--patch-size", "4", "--low-res", "0.5") == []
    assert unused("--dataset", "folder", "--image-size", "8", "--patch-size", "4", "--low-res", "0.5",
                  "--epochs", "2") == []  # its first epoch at 4 px (halfway, 6, rounded down to whole patches)
    assert unused("--dataset", "folder", "--mlstm-form", "chunkwise", "--chunk-size", "16", "--image-size", "48",
                  "--flip", "--tta", "--policy", "randaugment", "--policy-ops", "3") == []
    assert unused("--dataset", "mnist", "--pad-to", "40", "--policy", "trivialaugment", "--policy-magnitude", "5") == []
    # named as given: --no-flip, not --flip
    assert unused("--dataset", "mnist", "--no-flip", "--no-tta") == [
        "--no-flip (for datasets other than hand-written digits)", "--no-tta (for runs that train with random flips)"]


def test_a_new_run_opens_with_its_recipe_and_its_flags_without_effect_and_a_resumed_one_without(data_dir, tmp_path,
                                                                                                capsys, monkeypatch):
    monkeypatch.setitem(training.RECIPES, "folder", dict(epochs=1, ema=0.5))  # a recipe short enough for a test
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--chunk-size", "16",
                                      "--policy-ops", "3"], capsys)
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("folder: ")
    assert lines[1] == "recipe for folder (RECIPES in training.py): --epochs 1 --ema 0.5"
    assert lines[2] == ("note: no effect in this run: --chunk-size 16 (for --mlstm-form chunkwise), --policy-ops 3 "
                        "(for --policy randaugment)")
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 0, captured.err
    assert "resuming after epoch 1" in captured.out and "recipe for" not in captured.out and "note:" not in captured.out
    assert "only the test set" not in captured.out  # epoch 2 is still to train
    # a finished run resumed as it is: nothing to train, and the opening line says so
    code, captured = run_main(["--resume", "--out-dir", str(out)], capsys)
    assert code == 0, captured.err
    assert ("resuming after epoch 2: training is done (2 epochs), so only the test set is evaluated again"
            in captured.out), captured.out


def test_the_model_input_size_follows_the_dataset_and_its_flags():
    def size(dataset, **flags):
        return training.model_image_size({**training.DEFAULTS, "dataset": dataset, **flags})

    assert size("cifar10") == (32, 32) and size("cifar10", pad_to=64) == (32, 32)  # only digits are padded
    assert size("mnist") == (32, 32) and size("mnist", pad_to=0) == (28, 28) and size("mnist", pad_to=20) == (28, 28)
    assert size("folder", image_size=48) == (48, 48)


def test_defaults_pass_the_checks_and_recipes_list_only_what_differs():
    training.check_config(training.DEFAULTS)
    for dataset, recipe in training.RECIPES.items():
        assert dataset in FLAGS["dataset"].allowed
        for name, value in recipe.items():
            assert name in FLAGS and value != training.DEFAULTS[name], (dataset, name)
        training.check_config({**training.DEFAULTS, **recipe, "dataset": dataset})
    assert set(training.RESUME_OVERRIDABLE) <= set(FLAGS)


def recipe_line(*argv):
    config, given = training.parse_config(list(argv))[:2]
    return training.recipe_line(config, given, training.check_model_flags(config))


def test_a_new_run_names_the_settings_its_recipe_gave_as_flags_that_give_them_back():
    # --help shows the general defaults; the run's opening lines say what the dataset's recipe changed
    for dataset, recipe in training.RECIPES.items():
        config = training.parse_config(["--dataset", dataset])[0]
        line = recipe_line("--dataset", dataset)
        assert line.startswith(f"recipe for {dataset} (RECIPES in training.py): ")
        flags = line.split(": ", 1)[1].split()
        again = training.parse_config(["--dataset", dataset] + flags)[0]
        assert all(again[name] == value for name, value in recipe.items()) and again == config, dataset
    # a setting the command line gave is not the recipe's, even where it gave the recipe's own value
    line = recipe_line("--dataset", "cifar", "--lr", "2e-3", "--drop-path", "0")
    recipe_epochs = training.RECIPES["cifar10"]["epochs"]
    assert f"--epochs {recipe_epochs}" in line and "--policy randaugment" in line and "--lr" not in line
    assert "--drop-path" not in line
    # a given --epochs ends the recipe's budget too; a setting with no effect in the run is not listed
    assert recipe_line("--dataset", "cifar", "--epochs", "33") == (
        "recipe for cifar10 (RECIPES in training.py): --lr 0.002 --policy randaugment --policy-ops 1 "
        "--drop-path 0.05 --tta-shift 2")
    assert "--policy-ops" not in recipe_line("--dataset", "cifar", "--policy", "trivialaugment")
    assert recipe_line("--dataset", "folder", "--epochs", "3") is None
    assert [training.option_text("flip", value) for value in (True, False)] == ["--flip", "--no-flip"]


def test_help_shows_every_flag_with_its_range():
    text = " ".join(training.build_parser().format_help().split())  # argparse wraps lines
    for name, flag in FLAGS.items():
        assert option(name) in text
        if isinstance(flag.allowed, str):
            assert f"in {flag.allowed}" in text, name


def test_readme_lists_the_flags_of_the_table_group_by_group():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| group |")]
    listed = {group: re.findall(r"`--([a-z0-9-]+)", flags) for group, flags in rows}
    expected = {title: [option(name)[2:] for name in flags] for title, flags in training.FLAGS.items()}
    assert listed == {**expected, "continue or evaluate a saved run": SAVED_RUN_FLAGS}
    for group, flags in rows:
        for name in training.FLAGS.get(group, {}):
            for choice in FLAGS[name].allowed if isinstance(FLAGS[name].allowed, tuple) else ():
                assert choice in flags, (name, choice)


# Robustness: the run folder belongs to one run, nothing non-finite or half-written is saved, a
# damaged or mismatched run folder gets a message, and an interrupted run says truly what it left.

def one_epoch_run(data_dir, out, *args):
    code = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1", *args])[0]
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A run folder after one epoch, for tests that copy it and damage the copy."""
    return one_epoch_run(data_dir, tmp_path_factory.mktemp("trained") / "run")


def copy_run(trained_run, tmp_path, name="run"):
    import shutil
    return shutil.copytree(trained_run, tmp_path / name)


def test_a_run_folder_in_use_by_another_run_refuses_a_second_one(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = training.RunFolder(None)  # the first run: it holds the folder's lock
    holder.claim(str(out), "unused", resume=False)
    try:
        for args in (TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"],
                     ["--resume", "--out-dir", str(out)]):
            code, captured = run_main(args, capsys)
            assert code == 2
            assert captured.err == f"error: another run is using {out} (pid {os.getpid()}); wait for it to " \
                                   f"end, or choose another --out-dir\n"
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.release()


def test_runs_started_in_the_same_second_without_out_dir_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = training.RunFolder(None), training.RunFolder(None)
    try:
        first.claim(None, "folder-vil-1m-20261125-101500", resume=False)
        second.claim(None, "folder-vil-1m-20261125-101500", resume=False)
        assert first.out_dir == os.path.join("runs", "folder-vil-1m-20261125-101500")
        assert second.out_dir == first.out_dir + "-2"
    finally:
        first.release()
        second.release()
    assert os.listdir("runs") == []  # neither saved anything: no empty folders left behind


@pytest.mark.parametrize("runs_before", [False, True])
def test_a_failed_start_leaves_no_run_folder_and_no_runs_folder_it_made(tmp_path, capsys, monkeypatch, runs_before):
    monkeypatch.chdir(tmp_path)
    if runs_before:
        os.mkdir("runs")
    code, captured = run_main(TINY + ["--data-dir", str(tmp_path / "no-such-folder"), "--epochs", "1"], capsys)
    assert code == 2 and "error: " in captured.err
    assert os.listdir(tmp_path) == (["runs"] if runs_before else [])  # a runs/ of the user's stays, empty
    assert not runs_before or os.listdir("runs") == []


@pytest.mark.parametrize("name", training.RUN_FILES)
def test_a_new_run_refuses_a_folder_that_holds_any_run_file(data_dir, tmp_path, capsys, name):
    # e.g. a folder whose checkpoint.pt was deleted: its best.pt, metrics.jsonl and final.json stay
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("of an earlier run")
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2 and captured.err.startswith(f"error: {out} already holds a run ({name})"), captured.err
    assert sorted(os.listdir(out)) == [".lock", name] and (out / name).read_text() == "of an earlier run"


def test_weights_that_turn_nan_on_the_last_step_of_an_epoch_are_never_saved(data_dir, tmp_path, capsys,
                                                                          monkeypatch):
    # the loss of that step is finite (computed before the step); the NaN gradient makes the weights NaN
    out, calls = tmp_path / "run", []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_then_poison(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 6 + 6:  # the last step of epoch 2 (6 steps per epoch)
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_poison)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "2",
                                      "--ema", "0.5"], capsys)
    assert code == 1, captured.err
    message = captured.err.splitlines()[-1]  # after the progress lines
    assert message.startswith("error: the weights became non-finite (nan or inf) by the end of epoch 2")
    assert f"the last checkpoint {out / 'checkpoint.pt'} (epoch 1) is unchanged" in message
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert not (out / "final.json").exists()
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_full_disk_at_the_end_of_an_epoch_stops_with_a_message_and_keeps_the_last_checkpoint(
        data_dir, tmp_path, capsys, monkeypatch):
    import errno
    out, calls = tmp_path / "run", []
    real_save = training.save_checkpoint

    def full_disk_at_epoch_2(state, path):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(state, path)

    monkeypatch.setattr(training, "save_checkpoint", full_disk_at_epoch_2)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3"], capsys)
    assert code == 2
    checkpoint = out / "checkpoint.pt"
    assert captured.err.splitlines()[-1].startswith(
        f"error: cannot write {checkpoint} (No space left on device); the last checkpoint {checkpoint} "
        f"(epoch 1) is intact; continue with: "), captured.err
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1


def without(path, key, inside=None):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del (checkpoint[inside] if inside else checkpoint)[key]
    torch.save(checkpoint, path)


def test_a_damaged_run_folder_gets_a_message_naming_the_file(trained_run, data_dir, tmp_path, capsys):
    cases = {  # what is damaged -> (the file the message names, what it says)
        "metrics": ("metrics.jsonl", "line 2, is not a metrics record"),
        "optimizer": ("checkpoint.pt", "lacks optimizer"),
        "step": ("checkpoint.pt", "lacks step"),
        "partial": ("checkpoint.pt", "lacks partial"),
        "config": ("checkpoint.pt", "lacks lr, weight_decay"),
    }
    for case, (name, message) in cases.items():
        out = copy_run(trained_run, tmp_path, case)
        if case == "metrics":
            with open(out / "metrics.jsonl", "a") as f:
                f.write('{"epoch": 2, "train_lo\n')
        elif case == "config":
            for key in ("lr", "weight_decay"):
                without(out / "checkpoint.pt", key, inside="config")
        else:
            without(out / "checkpoint.pt", case)
        code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
        assert code == 2, (case, captured.err)
        assert captured.err.startswith("error: ") and str(out / name) in captured.err, (case, captured.err)
        assert message in captured.err, (case, captured.err)
    out = copy_run(trained_run, tmp_path, "eval")
    without(out / "checkpoint.pt", "model_config", inside="config")
    code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt")], capsys)
    assert code == 2 and "lacks model_config" in captured.err and str(out / "checkpoint.pt") in captured.err


def test_image_folder_classes_are_saved_and_a_change_is_refused(trained_run, data_dir, tmp_path, capsys):
    import shutil
    assert json.loads((trained_run / "config.json").read_text())["classes"] == ["dark", "light"]
    renamed = tmp_path / "renamed"  # "light" renamed "bright": same count, other meaning
    shutil.copytree(data_dir, renamed, ignore=shutil.ignore_patterns(".vil-cache"))
    for split in ("train", "test"):
        os.rename(renamed / split / "light", renamed / split / "bright")
    out = copy_run(trained_run, tmp_path)
    for args in (["--resume", "--out-dir", str(out), "--epochs", "2", "--data-dir", str(renamed)],
                 ["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", str(renamed)]):
        code, captured = run_main(args, capsys)
        assert code == 2, captured.err
        assert captured.err.startswith(f"error: the class folders of {renamed / 'train'} are not those "
                                       f"{out / 'checkpoint.pt'} was trained on (new: bright; missing: light)")
    single = tmp_path / "single"  # one class: nothing to tell apart
    write_folder_dataset(str(single), train_per_class=16, test_per_class=4)
    for split in ("train", "test"):
        shutil.rmtree(single / split / "light")
    code, captured = run_main(TINY + ["--data-dir", str(single), "--out-dir", str(tmp_path / "one"),
                                      "--epochs", "1"], capsys)
    assert code == 2 and "needs at least 2 classes" in captured.err, captured.err


def test_amp_auto_on_a_gpu_is_bf16_from_ampere_on_not_where_bf16_is_emulated(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert training.autocast_dtype("auto", gpu) is None
    assert training.autocast_dtype("bf16", gpu) == torch.bfloat16  # asked for: granted (emulated)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert training.autocast_dtype("auto", gpu) == torch.bfloat16


def test_a_run_resumes_under_another_amp(trained_run, tmp_path, capsys):
    # a run moved to a device where its --amp does not work (fp16 on a CPU) continues under another
    out = copy_run(trained_run, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["amp"] == "off"
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2", "--amp", "bf16"], capsys)
    assert code == 0, captured.err
    assert "ignoring" not in captured.out
    assert json.loads((out / "final.json").read_text())["autocast"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"


def test_resume_refuses_fewer_epochs_than_the_run_has_begun(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["step"] = 2  # saved partway into epoch 2, as a stop there does
    torch.save(checkpoint, out / "checkpoint.pt")
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "final.json")}
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2 and "1 epoch and 2 steps of epoch 2 already" in captured.err, captured.err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_mid_epoch_partial_state_is_shared_out_over_the_processes_of_the_resumed_run():
    # to_partial keeps the sums of all processes; each of N resumed processes starts from a share,
    # and end_epoch's sum over the processes gives back the saved totals
    meter = training.EpochMeter(5, torch.device("cpu"))
    for step, (loss, correct) in enumerate([(2.0, 3), (1.5, 5), (1.0, 6)]):
        meter.add(step, torch.tensor(loss), torch.tensor(correct), 8)
    partial = meter.to_partial(3)
    assert partial["sums"] == pytest.approx([8 * (2.0 + 1.5 + 1.0), 14]) and partial["seen"] == 24
    for world_size in (1, 2, 3, 5):
        shares = [training.EpochMeter.from_partial(partial, 3, 5, torch.device("cpu"), world_size)
                  for _ in range(world_size)]
        assert sum(share.sums for share in shares).tolist() == pytest.approx(partial["sums"])
        assert sum(share.seen for share in shares) == pytest.approx(24)
        assert all(share.step_losses[:3].tolist() == [2.0, 1.5, 1.0] for share in shares)


def test_the_old_preset_name_vil_seed_still_works_for_commands_and_saved_runs(trained_run, tmp_path, capsys):
    config = training.parse_config(["--dataset", "cifar", "--model", "vil-seed"])[0]
    assert (config["dataset"], config["model"]) == ("cifar10", "vil-1m")
    old, new = create_model("vil-seed"), create_model("vil-1m")
    assert old.config == new.config
    out = copy_run(trained_run, tmp_path)  # a run saved when the preset was called vil-seed
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["config"]["model"] = "vil-seed"
    torch.save(checkpoint, out / "checkpoint.pt")
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 0, captured.err
    assert json.loads((out / "final.json").read_text())["model"] == "vil-1m"


def test_a_resumed_optimizer_uses_the_fused_kernel_of_this_device(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path)
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = True  # as a run on a GPU saves it
    torch.save(checkpoint, out / "checkpoint.pt")
    assert run_main(["--resume", "--out-dir", str(out), "--epochs", "2"])[0] == 0
    resumed = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2
    assert [group["fused"] for group in resumed["optimizer"]["param_groups"]] == \
        [False] * len(resumed["optimizer"]["param_groups"])


def test_sigterm_while_the_data_loads_stops_with_a_message_and_saves_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    # training.py with a data loader that takes a minute, as a large dataset does
    script = ("import sys, time, training\n"
              "def slow_load(*args, **kwargs):\n"
              "    print('loading', file=sys.stderr, flush=True)\n"
              "    time.sleep(60)\n"
              "training.load_dataset = slow_load\n"
              "sys.exit(training.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", script, *TINY, "--data-dir", data_dir, "--out-dir", str(out)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.stderr.readline() not in ("loading\n", ""):
        pass
    process.send_signal(signal.SIGTERM)
    out_text, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.endswith("\ninterrupted before training started; nothing was saved\n")
    assert sorted(os.listdir(out)) == [".lock"]


def test_ctrl_c_in_the_final_evaluation_names_the_checkpoint_and_a_command_that_pastes(data_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    import shlex
    out = tmp_path / "my run"  # a space in the folder's name
    real_evaluate = training.evaluate

    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", interrupted_evaluate)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 130
    message, command = captured.err.splitlines()[-1].split("; continue with: ")
    assert message == f"interrupted; the last checkpoint {out / 'checkpoint.pt'} (epoch 1) is saved"
    assert not (out / "final.json").exists()
    monkeypatch.undo()
    args = shlex.split(command)
    assert args[:2] == ["python", "training.py"] and args[2:] == ["--resume", "--out-dir", str(out)]
    assert run_main(args[2:])[0] == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == 1


def test_ctrl_c_pressed_twice_still_saves_the_partial_epoch(data_dir, tmp_path, capsys, monkeypatch):
    out, calls = tmp_path / "run", []
    real_cross_entropy = training.F.cross_entropy

    def loss_then_two_interrupts(logits, target, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":
            calls.append(1)
            if len(calls) == 6 + 3:  # epoch 2, step 3
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_cross_entropy(logits, target, **kwargs)

    monkeypatch.setattr(training.F, "cross_entropy", loss_then_two_interrupts)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3"], capsys)
    assert code == 130
    assert f"the last checkpoint {out / 'checkpoint.pt'} (epoch 2, step 3 of 6) is saved" in captured.err
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3)


def interrupt_at(monkeypatch, step):
    """Ctrl-C during the given training step (counted over the run, from 1)."""
    real_cross_entropy, calls = training.F.cross_entropy, []

    def loss_then_interrupt(logits, target, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGINT)
        return real_cross_entropy(logits, target, **kwargs)

    monkeypatch.setattr(training.F, "cross_entropy", loss_then_interrupt)


def test_a_run_resumes_only_on_a_training_split_of_its_size(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 6 + 3)  # epoch 2 (6 steps an epoch), step 3
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3"], capsys)
    assert code == 130 and "(epoch 2, step 3 of 6) is saved" in captured.err
    monkeypatch.undo()
    # --eval-only names the point the run stopped at as the stop did (a copy: its result file stays out of the run)
    partial = tmp_path / "partial.pt"
    partial.write_bytes((out / "checkpoint.pt").read_bytes())
    code, captured = run_main(["--eval-only", "--checkpoint", str(partial), "--data-dir", data_dir], capsys)
    assert code == 0 and f"of {partial} (epoch 2, step 3 of 6)" in captured.out, captured.out
    assert json.loads((tmp_path / "eval-partial.json").read_text())["step"] == 3
    before = (out / "checkpoint.pt").read_bytes()
    # 48, 98 or 128 training images, 3, 6 or 8 steps an epoch: the run's order of batches would not continue
    for per_class, steps in ((24, 3), (49, 6), (64, 8)):
        other = tmp_path / f"data-{per_class}"
        write_folder_dataset(str(other), train_per_class=per_class)
        code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", str(other)], capsys)
        assert code == 2 and (f"was saved at epoch 2, step 3 of 6 of a run on 96 images, but the training split "
                              f"now has {2 * per_class} images, {steps} steps an epoch") in captured.err, captured.err
        assert "Traceback" not in captured.err and (out / "checkpoint.pt").read_bytes() == before
    # a checkpoint from before the steps were saved: refused where its step lies past the new epoch's end
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    del checkpoint["steps_per_epoch"], checkpoint["train_size"]
    torch.save(checkpoint, out / "checkpoint.pt")
    code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", str(tmp_path / "data-24")], capsys)
    assert code == 2 and "was saved at epoch 2, step 3 of a run, but the training split now has 48 images" in \
        captured.err, captured.err
    code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", data_dir], capsys)
    assert code == 0 and "resuming after epoch 2, step 3 of 6" in captured.out, captured.err


def test_eval_only_of_an_image_folder_run_needs_only_the_test_folder(data_dir, trained_run, tmp_path, capsys):
    import shutil
    only_test = tmp_path / "only-test"
    shutil.copytree(os.path.join(data_dir, "test"), only_test / "test")  # the class names come from the checkpoint
    checkpoint = str(copy_run(trained_run, tmp_path) / "checkpoint.pt")
    results = []
    for name in ("dark", "light"):  # each class alone, labelled by its saved index (test/'s own would make it 0)
        shutil.copytree(os.path.join(data_dir, "test", name), tmp_path / f"only-{name}" / "test" / name)
    for root in (data_dir, only_test, tmp_path / "only-dark", tmp_path / "only-light"):
        code, captured = run_main(["--eval-only", "--checkpoint", checkpoint, "--data-dir", str(root)], capsys)
        assert code == 0, captured.err
        results.append(json.loads((tmp_path / "run" / "eval-checkpoint.json").read_text())["test_acc"])
    assert results[0] == results[1] == pytest.approx((results[2] + results[3]) / 2)  # 16 test images of each


def test_the_opening_line_names_the_model_flags_that_changed_the_preset(data_dir, tmp_path, capsys):
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--epochs", "1",
                                      "--pooling", "bilateral_avg", "--chunk-size", "8"], capsys)
    assert code == 0, captured.err
    # TINY's --patch-size 4 is vil-1m's own, and --chunk-size does nothing to the parallel form: both go unnamed
    assert " | vil-1m --dim 32 --depth 2 --pooling bilateral_avg: 0.02M parameters" in captured.out, captured.out


@pytest.mark.parametrize("classes", [["dark", "dark"], "dark light", ["dark", "../elsewhere"], ["dark", ""],
                                     ["dark", ".vil-cache"], ["dark", "light", "grey"], ["dark", 1]])
def test_saved_class_names_that_are_no_class_folders_of_the_model_are_refused(trained_run, data_dir, tmp_path, capsys,
                                                                             classes):
    checkpoint = torch.load(trained_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["config"]["classes"] = classes  # edited by hand: names that lead out of test/, or too many
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    code, captured = run_main(["--eval-only", "--checkpoint", str(path), "--data-dir", data_dir], capsys)
    assert code == 2 and ("are not distinct class-folder names, one for each of its model's 2 classes"
                          in captured.err), captured.err


def test_a_run_stopped_between_epochs_refuses_a_changed_training_split_too(trained_run, tmp_path, capsys):
    out, other = copy_run(trained_run, tmp_path), tmp_path / "more"
    write_folder_dataset(str(other), train_per_class=64)
    code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", str(other), "--epochs", "2"], capsys)
    assert code == 2 and (f"{out / 'checkpoint.pt'} was saved at epoch 1 of a run on 96 images, but the training "
                          f"split now has 128 images, 8 steps an epoch") in captured.err, captured.err


@pytest.mark.parametrize("draw", [["--limit-train", "64"], ["--val-size", "16", "--limit-train", "64"]])
def test_a_split_drawn_from_a_grown_folder_is_refused_though_its_size_is_the_same(data_dir, tmp_path, capsys, draw):
    # 64 of the 96 images (of the 80 left after 16 held out): one image more in the folder draws other images,
    # and the split's size alone does not show it (a --val-size alone does: its split grows by the image)
    out = one_epoch_run(data_dir, tmp_path / "run", *draw)
    before = (out / "checkpoint.pt").read_bytes()
    grown = tmp_path / "grown"
    write_folder_dataset(str(grown))
    shutil.copy(grown / "train" / "dark" / "0.png", grown / "train" / "dark" / "extra.png")
    code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", str(grown), "--epochs", "2"], capsys)
    assert code == 2 and (f"was saved at epoch 1 of a run whose 64 training images were drawn from 96, but "
                          f"there are 97 to draw from now") in captured.err, captured.err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_lock_file_that_cannot_be_opened_is_named_not_a_traceback(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    os.remove(out / ".lock")
    os.mkdir(out / ".lock")  # as a lock file of another user's would refuse to open
    before = (out / "checkpoint.pt").read_bytes()
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 2 and captured.err == (f"error: cannot open the run folder's lock file {out / '.lock'} (Is a "
                                          f"directory); remove it if no run is using {out}\n"), captured.err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_run_folder_too_deep_for_its_files_names_is_refused_before_training(data_dir, tmp_path, capsys):
    # the folder itself can be made, but not the temporary file of its first save ('.metrics.jsonl.xxxxxxxx.tmp'):
    # found out at the end of the first epoch before, the epoch lost
    limit = os.pathconf(tmp_path, "PC_PATH_MAX")
    out = str(tmp_path)
    while len(out) < limit - 20 - 201:
        out = os.path.join(out, "d" * 200)
    out = os.path.join(out, "e" * (limit - 20 - len(out) - 1))  # 20 characters short of the limit
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", out, "--epochs", "1"], capsys)
    assert code == 2 and "cannot write to the run folder" in captured.err and "File name too long" in captured.err
    assert "epoch 1/1" not in captured.out + captured.err


def test_a_run_folder_name_that_is_not_text_prints_on_a_strict_utf8_stdout(data_dir, tmp_path):
    # a byte that is no UTF-8 in a folder's name: a strict stdout stopped the run (and --eval-only after its
    # evaluation, its result unwritten) with an encoding error
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run-\xe9")
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", OMP_NUM_THREADS="1")
    for args in (TINY + ["--data-dir", data_dir, "--out-dir", out, "--epochs", "1", "--limit-train", "32"],
                 ["--eval-only", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--data-dir", data_dir]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "training.py"), *args], cwd=ROOT, env=env,
                                capture_output=True, timeout=300)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
        assert b"run-\\udce9" in result.stdout  # as stderr shows it
    assert os.path.isfile(os.path.join(out, "final.json")) and os.path.isfile(os.path.join(out, "eval-checkpoint.json"))


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_a_checkpoint_that_is_a_folder_or_a_broken_link_is_named_on_resume(trained_run, tmp_path, capsys, kind):
    out = copy_run(trained_run, tmp_path)
    os.remove(out / "checkpoint.pt")
    if kind == "folder":
        os.mkdir(out / "checkpoint.pt")
    else:
        os.symlink(tmp_path / "gone.pt", out / "checkpoint.pt")
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    what = "a folder" if kind == "folder" else f"a broken link (to {tmp_path / 'gone.pt'})"
    assert code == 2 and captured.err == (f"error: {out / 'checkpoint.pt'} is {what}, not a checkpoint, so the run "
                                          f"cannot continue from it; put the run's checkpoint file there, or start "
                                          f"a new run in another --out-dir\n"), captured.err


def test_a_test_time_shift_as_large_as_the_image_is_refused(data_dir, trained_run, tmp_path, capsys):
    # 16-px images (TINY): a shift of 16 leaves 8 of the 10 views blank
    message = "--tta-shift 16 moves the 16-px images out of view; give less than 16"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "new"), "--tta-shift", "16"],
                              capsys)
    assert code == 2 and message in captured.err and not (tmp_path / "new").exists()
    out = copy_run(trained_run, tmp_path)
    for args in (["--resume", "--out-dir", str(out), "--epochs", "2"],
                 ["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir]):
        code, captured = run_main(args + ["--tta-shift", "16"], capsys)
        assert code == 2 and message in captured.err, captured.err
    code, captured = run_main(["--eval-only", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", data_dir,
                               "--tta-shift", "15"], capsys)
    assert code == 0, captured.err


def test_a_resumed_run_whose_loss_turns_non_finite_is_not_advised_flags_resume_ignores(trained_run, tmp_path,
                                                                                      capsys, monkeypatch):
    out = copy_run(trained_run, tmp_path)
    real_cross_entropy = training.F.cross_entropy
    monkeypatch.setattr(training.F, "cross_entropy", lambda logits, target, **kwargs: real_cross_entropy(
        logits, target, **kwargs) * (float("nan") if kwargs.get("reduction", "mean") == "mean" else 1.0))
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 1 and "non-finite" in captured.err
    # TINY's runs are float32 (--amp off) already: no advice to turn autocast off
    assert ("--resume keeps the run's --lr and --grad-clip: start a new run with a lower --lr or --grad-clip 1."
            in captured.err and "--amp" not in captured.err), captured.err


def test_signals_during_a_checkpoint_write_wait_until_it_is_written(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = training.save_checkpoint

    def save_amid_three_signals(state, path):  # the third would stop the run at once elsewhere
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(state, path)

    monkeypatch.setattr(training, "save_checkpoint", save_amid_three_signals)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3"], capsys)
    assert code == 130
    assert f"the last checkpoint {out / 'checkpoint.pt'} (epoch 1) is saved" in captured.err
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_failing_torch_compile_falls_back_to_eager_with_a_note(data_dir, tmp_path, capsys, monkeypatch):
    real_compile = torch.compile

    def no_c_compiler(graph, example_inputs):
        raise RuntimeError("simulated: no working C compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(model, backend=no_c_compiler,
                                                                                  **options))
    out = tmp_path / "run"
    try:
        code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1",
                                          "--compile"], capsys)
    finally:
        torch._dynamo.reset()
    assert code == 0, captured.err
    assert captured.err.count("note: torch.compile failed") == 1 and "training without it" in captured.err
    assert (out / "final.json").exists()


def dynamo_unsupported(*args, **kwargs):
    raise torch._dynamo.exc.Unsupported("simulated: a construct dynamo cannot trace")


def no_dynamo(model, **options):
    raise RuntimeError("Dynamo is not supported on Python 3.12+")  # torch.compile itself, on torch 2.3


@pytest.mark.parametrize("fake_compile, reason", [
    (lambda model, **options: dynamo_unsupported, "simulated: a construct dynamo cannot trace"),  # at the first call
    (no_dynamo, "Dynamo is not supported on Python 3.12+"),  # at torch.compile
], ids=["at-the-first-call", "at-torch-compile"])
def test_torch_compile_failing_elsewhere_falls_back_to_eager_too(data_dir, tmp_path, capsys, monkeypatch,
                                                                 fake_compile, reason):
    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1",
                                      "--compile"], capsys)
    assert code == 0, captured.err
    assert captured.err.count("note: torch.compile failed") == 1 and f"({reason}); training without it" in captured.err
    assert (out / "final.json").exists()


def test_a_parallel_form_that_cannot_fit_in_memory_is_refused_before_training(data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(training, "available_memory", lambda device: 2**20)  # 1 MiB free
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2
    message = captured.err.splitlines()[-1]  # after the data's decoding notes
    assert message.startswith("error: the parallel mLSTM form would need about ") and \
        "use --mlstm-form chunkwise" in message and "--patch-size" in message, captured.err
    assert not (out / "checkpoint.pt").exists()
    # the S x S matrices grow as S^2: 128-px images in patches of 4 (S = 1024) against 32-px ones (S = 64)
    small, large = (training.ViLConfig(img_size=size, patch_size=4) for size in (32, 128))
    assert training.parallel_form_bytes(large, 256, True) == 256 * training.parallel_form_bytes(small, 256, True)
    assert training.parallel_form_bytes(large, 256, True) > 24 * 2**30  # more than this 24-GiB machine has
    chunkwise = training.ViLConfig(img_size=128, patch_size=4, mlstm_form="chunkwise")
    training.check_parallel_form_memory(chunkwise, torch.device("cpu"), 256)  # linear in S: not refused


@pytest.mark.parametrize("dtype, factored", [(None, True), (torch.bfloat16, True), (None, False)],
                         ids=["float32", "bf16", "segment-sums"])
def test_the_memory_check_counts_the_s_by_s_matrices_a_training_step_keeps(dtype, factored, monkeypatch):
    # the form factors its decay matrix on a CPU unless compiled (or float16); the segment sums are what a GPU
    # or a compiled model runs, here forced on the CPU
    if not factored:
        monkeypatch.setattr(mlstm, "factors_decay_matrix", lambda *args: False)
    config = training.ViLConfig(img_size=16, patch_size=2, dim=24, depth=3, num_heads=2)  # S = 64, DH = 24
    seq_len = 64
    model, images = training.VisionLSTM(config), torch.randn(4, 3, 16, 16)
    kept = {}

    def pack(tensor):
        if tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (seq_len, seq_len):
            kept[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        model(images).float().sum()
    estimate = training.parallel_form_bytes(config, 4, True, "cpu", dtype, compiled=not factored)
    assert estimate - training.parallel_form_bytes(config, 4, False) == sum(kept.values()) > 0


def test_a_time_budget_cuts_the_epochs_to_what_fits_and_leaves_the_run_as_it_would_be(data_dir, tmp_path, capsys):
    # a budget no epoch fits: one epoch, with the estimate recorded; a resumed run keeps its epochs (no new fit)
    short = tmp_path / "short"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(short), "--epochs", "3",
                                      "--time-budget", "1e-6"], capsys)
    assert code == 0, captured.err
    assert "time budget 1e-06 min" in captured.out and "-> 1 of 3 epochs" in captured.out
    config = json.loads((short / "config.json").read_text())
    assert config["epochs"] == 1 and config["time_budget_fit"]["epochs_asked"] == 3
    assert config["time_budget_fit"]["seconds_per_step"] > 0
    assert json.loads((short / "final.json").read_text())["epochs"] == 1
    code, captured = run_main(["--resume", "--out-dir", str(short), "--epochs", "2"], capsys)
    assert code == 0 and "time budget" not in captured.out, captured.err
    assert len((short / "metrics.jsonl").read_text().splitlines()) == 2
    # a budget every epoch fits: the epochs asked for, and the same weights as a run without a budget
    # (the timed steps run on a copy and draw nothing from the run's random streams)
    runs = {}
    for name, extra in (("budget", ["--time-budget", "1e6"]), ("plain", [])):
        runs[name] = tmp_path / name
        code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(runs[name]), "--epochs", "2",
                                          "--ema", "0.9", "--drop-path", "0.2", "--mixup", "0.5"] + extra, capsys)
        assert code == 0, captured.err
        assert "(all " not in captured.out  # nothing was cut, so no note of what all the epochs would take
    assert json.loads((runs["budget"] / "config.json").read_text())["epochs"] == 2
    assert_same_weights(full_state(runs["budget"] / "checkpoint.pt"), full_state(runs["plain"] / "checkpoint.pt"))


def test_a_time_budget_trains_the_epochs_whose_timed_steps_fit_it(data_dir, tmp_path, capsys, monkeypatch):
    # steps of 1 s, epochs of 6 steps (96 images, batch 16): 0.3 minutes hold 3 of the 5 epochs asked for; the
    # first epoch takes the 6 s estimated (its clock: 1 s per 16 images seen), so the refit after it keeps them
    monkeypatch.setattr(training, "step_seconds", lambda run, sizes: [1.0] * len(sizes))
    monkeypatch.setattr(training.EpochMeter, "seconds", lambda meter: meter.seen / 16)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "5",
                                      "--time-budget", "0.3"], capsys)
    assert code == 0, captured.err
    assert "1.000 s a step" in captured.out
    assert "-> 3 of 5 epochs, about 0:18 of training (all 5: about 0:30)" in captured.out
    # 6 steps an epoch are too few to take a pace from its later steps: the whole epoch sets it
    assert "epoch 1 took 0:06 (estimated 0:06) -> 3 of 5 epochs, about 0:18 of training" in captured.out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == [1, 2, 3]
    # the schedule is the 3-epoch run's: the last step's learning rate is its cosine's end, not the 5-epoch one's
    schedule = training.schedule_steps({"epochs": 3, "warmup_epochs": 0.5}, 6)
    assert metrics[-1]["lr"] == pytest.approx(training.learning_rate(3 * 6 - 1, *schedule, 3e-3))


def test_epochs_in_budget_fills_the_budget_within_the_epochs_asked():
    for budget, epoch, asked in [(100.0, 7.0, 50), (100.0, 30.0, 2), (5.0, 9.0, 4), (60.0, 6.0, 10), (3000.0, 1.0, 33)]:
        first = training.epochs_in_budget(budget, epoch, asked)
        assert 1 <= first <= asked
        assert first == asked or first * epoch <= budget < (first + 1) * epoch or (first == 1 and epoch > budget)
        for done, spent in [(1, epoch), (1, 2.5 * epoch), (3, 40.0)]:
            if done >= asked:
                continue
            again = training.epochs_in_budget(budget, epoch, asked, done=done, spent=spent)
            # never fewer than one epoch more than done (the schedule must still run to its end), never more
            # than asked; within those, the most whose remaining epochs fit what the done ones left
            assert done + 1 <= again <= asked
            assert spent + (again - done) * epoch <= budget or again == done + 1
            assert again == asked or spent + (again + 1 - done) * epoch > budget


def clock_epochs(monkeypatch, seconds, step=lambda size: 0.25):
    """Timed steps of step(image size) seconds (0.25 s at any size by default), and a clock for each epoch's
    meter: seconds(index of the meter in the run, images it has seen) (the meters of one run are made one per
    epoch, in order)."""
    monkeypatch.setattr(training, "step_seconds", lambda run, sizes: [step(size) for size in sizes])
    meters = []

    def clock(meter):
        if meter not in meters:
            meters.append(meter)
        return seconds(meters.index(meter), meter.seen)

    monkeypatch.setattr(training.EpochMeter, "seconds", clock)


@pytest.mark.parametrize("budget, step, first_steps, expected", [
    (0.3, 1.5, 0.0, 2), (0.3, 2 / 3, 0.0, 4), (0.3, 0.1, 0.0, 12), (0.3, 10.0, 0.0, 2), (1.0, 1.0, 30.0, 5)])
def test_the_time_budget_refits_the_epochs_to_the_first_epochs_pace(data_dir, tmp_path, capsys, monkeypatch,
                                                                    budget, step, first_steps, expected):
    # batch 4: 24 steps an epoch. The timed steps say 0.25 s a step, 6 s an epoch: 0.3 minutes hold 3 of the 12
    # epochs asked for, 1 minute 10. The run's clock then gives `step` seconds per 16 images seen, and
    # `first_steps` seconds more spread over the first 3 steps of the first epoch (a compile, say). Epochs of 9 s
    # leave room in 0.3 minutes for one more (2 in all), of 4 s for 3 more, of 0.6 s for all 12, and of 60 s,
    # over the whole budget, still for one more, so that the learning rate decays to the schedule's end; the
    # 30 s of the first 3 steps count as spent, not as the pace (36 s spent and 4 epochs of 6 s in 1 minute).
    # The later refits of the first half, at the same pace, keep the epochs and print nothing
    clock_epochs(monkeypatch, lambda epoch, seen: (first_steps * min(seen, 12) / 12 if epoch == 0 else 0.0)
                 + seen / 16 * step)
    saved_epochs, save = [], training.save  # the epochs in the config of each checkpoint as it is saved
    monkeypatch.setattr(training, "save", lambda run, *args, **kwargs: (saved_epochs.append(run.config["epochs"]),
                                                                         save(run, *args, **kwargs)))
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "12",
                                      "--time-budget", str(budget), "--warmup-epochs", "1", "--batch-size", "4"],
                              capsys)
    assert code == 0, captured.err
    first_fit = min(12, int(60 * budget // 6))
    assert f"-> {first_fit} of 12 epochs" in captured.out
    took, paced = first_steps + 6 * step, 6 * step
    assert (f"epoch 1 took {format_seconds(took)} (estimated 0:06; {format_seconds(paced)} at its pace after 3 "
            f"steps) -> {expected} of 12 epochs, about {format_seconds(took + (expected - 1) * paced)} of "
            f"training") in captured.out
    assert "epochs took" not in captured.out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == list(range(1, expected + 1))
    # epoch 1 ran on the first fit's schedule, the others on the refitted one, to its end
    first, refitted = (training.schedule_steps({"epochs": epochs, "warmup_epochs": 1}, 24)
                       for epochs in (first_fit, expected))
    assert metrics[0]["lr"] == pytest.approx(training.learning_rate(23, *first, 3e-3))
    assert metrics[-1]["lr"] == pytest.approx(training.learning_rate(expected * 24 - 1, *refitted, 3e-3))
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == expected and json.loads((out / "final.json").read_text())["epochs"] == expected
    # refitted after epoch 1 and after each later epoch that ends within the first half of the run
    refits = [dict(epoch=done, spent_seconds=took + (done - 1) * paced, pace_seconds=paced, mean_pace_seconds=paced,
                   epochs=expected) for done in range(1, max(1, expected // 2) + 1)]
    fit = config["time_budget_fit"]
    assert [{key: pytest.approx(value) for key, value in refit.items()} for refit in refits] == fit.pop("refits")
    assert fit == pytest.approx(dict(seconds_per_step=0.25, epochs_asked=12, epochs_from_steps=first_fit,
                                     refit_pending=False, warmup_steps=refitted[1]))
    # every checkpoint, the first one too, holds the refitted epochs: a run resumed from it goes on to them
    assert saved_epochs == [expected] * expected
    assert captured.out.count("epoch 1 took") == 1


@pytest.mark.parametrize("epoch_seconds, expected, line", [
    # 6 s, then 12: 18 s spent leave 42 s, 4 epochs at the mean pace of 9 s; after the 3rd, at the mean of 10 s,
    # 30 s spent leave 30 s, 3 epochs: 6 still, and the first half is over
    ([6, 12, 12, 12, 12, 12], 6,
     "2 epochs took 0:18, at 0:09 an epoch (the mean of 2) -> 6 of 12 epochs, about 0:54 of training"),
    # 6 s, then 2: 8 s spent leave 52 s, all 12 epochs at the mean of 4 s; after the 6th (of 12) no more refits
    ([6] + [2] * 11, 12, "2 epochs took 0:08, at 0:04 an epoch (the mean of 2) -> 12 of 12 epochs, about 0:48"),
    # 6 s each through the first half of 10 epochs, then 1 s: the run keeps 10 epochs, not the 12 that now fit
    ([6] * 6 + [1] * 4, 10, None),
    # a pace that wanders about its mean keeps the plan: after 5 s, 7 s, 5 s, ... the mean stays at 5.5-6 s and
    # 10 epochs fit (59 s); each epoch's own pace would have asked for 11 after each 5 s epoch and 9 after a 7 s one
    ([6, 5, 7, 5, 7, 5, 7, 5, 7, 5], 10, None),
])
def test_the_time_budget_follows_the_machines_pace_through_the_first_half(data_dir, tmp_path, capsys, monkeypatch,
                                                                         epoch_seconds, expected, line):
    # batch 4: 24 steps an epoch; the timed steps say 6 s an epoch, so 1 minute holds 10 of the 12 asked for
    clock_epochs(monkeypatch, lambda epoch, seen: seen / 96 * epoch_seconds[epoch])
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "12",
                                      "--time-budget", "1", "--warmup-epochs", "1", "--batch-size", "4"], capsys)
    assert code == 0, captured.err
    assert "-> 10 of 12 epochs" in captured.out and "epoch 1 took 0:06 (estimated 0:06" in captured.out
    assert (line is None and "epochs took" not in captured.out) or line in captured.out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in metrics] == list(range(1, expected + 1))
    assert [record["seconds"] for record in metrics] == pytest.approx(epoch_seconds[:expected])
    schedule = training.schedule_steps({"epochs": expected, "warmup_epochs": 1}, 24)
    assert metrics[-1]["lr"] == pytest.approx(training.learning_rate(expected * 24 - 1, *schedule, 3e-3))
    fit = json.loads((out / "config.json").read_text())["time_budget_fit"]
    # one refit per epoch that ended within the first half of the run as planned after the refit before it
    assert [refit["epoch"] for refit in fit["refits"]] == list(range(1, expected // 2 + 1))
    assert fit["refits"][-1]["epochs"] == expected and not fit["refit_pending"]


def test_the_pace_of_an_epoch_is_that_of_its_steps_after_the_mark(monkeypatch):
    # an epoch of 24 steps resumed after 3 of them (30 s); 7 s pass before the mark after 3 more steps,
    # 36 s over the 18 after it: 2 s a step, 48 s an epoch at that pace; 73 s for the whole epoch
    clock = iter([100.0, 107.0, 143.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    partial = dict(sums=[0.0, 0.0], step_losses=[0.0] * 3, seen=12, seconds=30.0)
    meter = training.EpochMeter.from_partial(partial, 3, 24, torch.device("cpu"))
    meter.mark_pace(6)
    seconds = meter.seconds()
    assert seconds == pytest.approx(73.0)
    assert meter.paced_epoch_seconds(seconds) == pytest.approx(48.0)
    monkeypatch.undo()
    # too few steps after the mark to take a pace from, or no mark: none
    late = training.EpochMeter(24, torch.device("cpu"))
    late.pace_mark = (24 - training.BUDGET_TIMED_STEPS + 1, 10.0)
    assert late.paced_epoch_seconds(20.0) is None and training.EpochMeter(24, "cpu").paced_epoch_seconds(5.0) is None


def test_a_later_refit_lengthens_the_cosine_not_the_warm_up(data_dir, tmp_path, capsys, monkeypatch):
    # --warmup-epochs 5: a warm-up of min(5, 0.2 x epochs) epochs. The timed steps say 6 s an epoch: 10 of the 20
    # epochs asked for fit 1 minute, with a warm-up of 2 epochs (48 steps), which the refit after the first epoch
    # (6 s) keeps. The later epochs take 1 s: at the mean pace 17 epochs fit after the second (3.5 s an epoch) and
    # all 20 after the third (2.7 s), whose own warm-up would be 3.4 and 4 epochs; it stays at 48 steps, so the
    # learning rate, at its peak after epoch 2, does not fall back into a warm-up
    clock_epochs(monkeypatch, lambda epoch, seen: seen / 96 * (6.0 if epoch == 0 else 1.0))
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "20",
                                      "--time-budget", "1", "--warmup-epochs", "5", "--batch-size", "4"], capsys)
    assert code == 0, captured.err
    assert "-> 10 of 20 epochs" in captured.out and "(the mean of 2) -> 17 of 20 epochs" in captured.out
    assert "(the mean of 3) -> 20 of 20 epochs" in captured.out
    fit = json.loads((out / "config.json").read_text())["time_budget_fit"]
    assert fit["warmup_steps"] == 48
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rates) == 20 and rates[1] == pytest.approx(3e-3)
    assert all(later <= earlier for earlier, later in zip(rates[1:], rates[2:]))
    assert rates[-1] == pytest.approx(training.learning_rate(20 * 24 - 1, 20 * 24, 48, 3e-3))


def test_a_run_stopped_in_its_first_half_is_refitted_when_resumed_unless_given_epochs(data_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    # 24 steps an epoch; the timed steps say 6 s an epoch: 0.6 minutes hold 6 of the 8 epochs asked for. The first
    # epoch takes 9 s: 4 epochs; the second 4.5 s: 5 at the mean pace of 6.75 s (13.5 s spent, 22.5 s left), and
    # the first half is over. A resumed epoch takes its pace from its steps after its own first 3
    monkeypatch.setattr(training, "step_seconds", lambda run, sizes: [0.25] * len(sizes))
    rate, end_epoch = [1.5], training.end_epoch  # seconds per 16 images: 1.5 in the first epoch, 0.75 after

    def end_epoch_then_faster(run, epoch, meter, seconds):
        end_epoch(run, epoch, meter, seconds)
        rate[0] = 0.75

    # `warm` seconds more over the first 3 steps after a resume (a resumed run warms up again)
    warm, from_partial = [0.0], training.EpochMeter.from_partial

    def from_partial_marked(partial, *args, **kwargs):
        meter = from_partial(partial, *args, **kwargs)
        meter.resumed_at = meter.seen if partial else None
        return meter

    def clock(meter):
        resumed = getattr(meter, "resumed_at", None)
        return meter.seen / 16 * rate[0] + (0.0 if resumed is None else warm[0] * min(meter.seen - resumed, 12) / 12)

    monkeypatch.setattr(training.EpochMeter, "seconds", clock)
    monkeypatch.setattr(training.EpochMeter, "from_partial", from_partial_marked)
    monkeypatch.setattr(training, "end_epoch", end_epoch_then_faster)
    common = TINY + ["--data-dir", data_dir, "--epochs", "8", "--time-budget", "0.6", "--ema", "0.9",
                     "--batch-size", "4"]
    straight = tmp_path / "straight"
    code, captured = run_main(common + ["--out-dir", str(straight)], capsys)
    assert code == 0, captured.err
    assert ("2 epochs took 0:14, at 0:07 an epoch (the mean of 2) -> 5 of 8 epochs, about 0:34 of training"
            in captured.out)
    refits = json.loads((straight / "config.json").read_text())["time_budget_fit"]["refits"]
    assert [(refit["epoch"], refit["epochs"]) for refit in refits] == [(1, 4), (2, 5)]
    real_cross_entropy, calls, stop_at = training.F.cross_entropy, [], [0]

    def loss_then_interrupt(logits, target, **kwargs):  # Ctrl-C during step stop_at[0] (no timed steps here)
        if kwargs.get("reduction", "mean") == "mean":
            calls.append(1)
            if len(calls) == stop_at[0]:
                os.kill(os.getpid(), signal.SIGINT)
        return real_cross_entropy(logits, target, **kwargs)

    # stopped in step 3 of epoch 1, at the end of epoch 1 (a signal in its last step) or in step 3 of epoch 2;
    # resumed with --epochs, even the number the timed steps chose, the run keeps the epochs given
    for name, stop, extra, epochs in (("split-1", 3, [], 5), ("boundary", 24, [], 5), ("split-2", 27, [], 5),
                                      ("given", 3, ["--epochs", "6"], 6)):
        out = tmp_path / name
        rate[0], stop_at[0] = 1.5, stop
        with monkeypatch.context() as patch:
            patch.setattr(training.F, "cross_entropy", loss_then_interrupt)
            calls.clear()
            assert run_main(common + ["--out-dir", str(out)], capsys)[0] == 130
        code, captured = run_main(["--resume", "--out-dir", str(out), *extra], capsys)
        assert code == 0, captured.err
        assert json.loads((out / "final.json").read_text())["epochs"] == epochs
        assert ("epoch 1 took 0:09 (estimated 0:06; 0:09 at its pace" in captured.out) == (name == "split-1")
        assert ("2 epochs took 0:14" in captured.out) == (not extra)
        if not extra:  # the refits in the resumed run are the uninterrupted run's
            assert json.loads((out / "config.json").read_text())["time_budget_fit"]["refits"] == refits
            assert_same_weights(full_state(straight / "checkpoint.pt"), full_state(out / "checkpoint.pt"))
    # stopped in epoch 2 and resumed on a machine whose first 3 steps take 9 s more: those count as spent
    # (22.5 s), not as the pace, which the steps after them set (4.5 s an epoch, 6.75 s with the first epoch's
    # 9 s, whose pace the resumed run's config keeps): 4 epochs, not the 3 that an epoch paced whole (13.5 s) would
    # leave
    out, rate[0], stop_at[0] = tmp_path / "warm", 1.5, 27
    with monkeypatch.context() as patch:
        patch.setattr(training.F, "cross_entropy", loss_then_interrupt)
        calls.clear()
        assert run_main(common + ["--out-dir", str(out)], capsys)[0] == 130
    warm[0] = 9.0
    assert run_main(["--resume", "--out-dir", str(out)], capsys)[0] == 0
    resumed = json.loads((out / "config.json").read_text())["time_budget_fit"]["refits"]
    assert resumed[1] == pytest.approx(dict(epoch=2, spent_seconds=22.5, pace_seconds=4.5, mean_pace_seconds=6.75,
                                            epochs=4))


def test_the_cifar_recipe_fits_its_time_budget_at_low_res_unless_epochs_are_given():
    config = training.parse_config(["--dataset", "cifar"])[0]
    assert config["time_budget"] == training.RECIPES["cifar10"]["time_budget"] > 0
    assert config["low_res"] == training.RECIPES["cifar10"]["low_res"] < 1
    fixed = training.parse_config(["--dataset", "cifar", "--epochs", "100"])[0]
    assert (fixed["time_budget"], fixed["low_res"]) == (0, 1)
    both = training.parse_config(["--dataset", "cifar", "--epochs", "100", "--time-budget", "30", "--low-res",
                                  "0.5"])[0]
    assert (both["epochs"], both["time_budget"], both["low_res"]) == (100, 30, 0.5)
    assert training.parse_config(["--dataset", "mnist"])[0]["time_budget"] == 0


def test_a_run_saved_before_the_time_budget_and_low_res_existed_resumes_without_them(trained_run, tmp_path,
                                                                                       capsys, monkeypatch):
    out = copy_run(trained_run, tmp_path)
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    del checkpoint["config"]["time_budget"], checkpoint["config"]["low_res"]
    torch.save(checkpoint, out / "checkpoint.pt")
    sizes, train_step = set(), training.train_step
    monkeypatch.setattr(training, "train_step", lambda run, x, y, step: (sizes.add(tuple(x.shape[-2:])),
                                                                          train_step(run, x, y, step))[1])
    # epochs 2-6 of 6: under --low-res 0.5 the second would train at 8 px, the third and fourth at 12
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "6"], capsys)
    assert code == 0, captured.err
    assert "time budget" not in captured.out and sizes == {(16, 16)}
    config = json.loads((out / "config.json").read_text())
    assert (config["time_budget"], config["low_res"]) == (0, 1)


@pytest.mark.parametrize("key, value, named", [
    ("dataset", "mnist", "model_config in_chans 3"),  # a 1-channel dataset for a model of 3-channel images
    ("dataset", "imagenet", "--dataset must be one of"),
    ("model", "vil-x", "--model must be one of"),
])
def test_a_checkpoint_whose_saved_configuration_was_edited_is_refused_by_name(trained_run, tmp_path, capsys,
                                                                                key, value, named):
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"][key] = value
    torch.save(checkpoint, path)
    before = path.read_bytes()
    for args in (["--resume", "--out-dir", str(out), "--epochs", "2"], ["--eval-only", "--checkpoint", str(path)]):
        code, captured = run_main(args, capsys)
        if key == "model" and args[0] == "--eval-only":
            # evaluation builds the model from model_config, not from the preset's name: nothing to refuse
            assert code == 0, captured.err
            continue
        assert code == 2, captured.err
        assert f"the configuration saved in {path}" in captured.err and named in captured.err
    assert path.read_bytes() == before  # refused before anything was written


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_a_checkpoint_with_non_finite_weights_is_refused_by_name(data_dir, tmp_path, capsys, weights):
    # evaluated, it reported "loss nan" and exited 0, as did a resume with no epochs left
    out = one_epoch_run(data_dir, tmp_path / "run", "--ema", "0.5")
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["model"] if weights == "model" else checkpoint["ema"]["shadow"]
    name = sorted(state)[-1]
    state[name].view(-1)[-1] = float("inf")
    torch.save(checkpoint, path)
    before = path.read_bytes()
    for args in (["--eval-only", "--checkpoint", str(path)], ["--resume", "--out-dir", str(out)],
                 ["--resume", "--out-dir", str(out), "--epochs", "2"]):
        code, captured = run_main(args, capsys)
        assert code == 2 and f"{path} holds a non-finite (nan or inf)" in captured.err and name in captured.err
    assert not (out / "eval-checkpoint.json").exists() and path.read_bytes() == before


def test_a_saved_data_dir_its_flag_refuses_is_named_as_the_checkpoint_s_unless_given(trained_run, data_dir, tmp_path,
                                                                                      capsys):
    # a setting the command line may replace was not checked where the run took it from the checkpoint
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"]["data_dir"] = None
    torch.save(checkpoint, path)
    for args in (["--resume", "--out-dir", str(out)], ["--eval-only", "--checkpoint", str(path)]):
        code, captured = run_main(args, capsys)
        assert code == 2 and f"the configuration saved in {path}" in captured.err
        assert "--data-dir must be a str, got None; give --data-dir to replace it" in captured.err
    code, captured = run_main(["--resume", "--out-dir", str(out), "--data-dir", data_dir], capsys)
    assert code == 0 and "test accuracy" in captured.out


def test_a_refused_saved_on_off_setting_names_both_of_its_flags(trained_run, tmp_path, capsys):
    # "give --tta to replace it" left out the flag that turns it off
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"]["tta"] = "yes"
    torch.save(checkpoint, path)
    code, captured = run_main(["--eval-only", "--checkpoint", str(path)], capsys)
    assert code == 2 and "--tta must be a bool, got 'yes'; give --tta or --no-tta to replace it" in captured.err
    code, captured = run_main(["--eval-only", "--checkpoint", str(path), "--no-tta"], capsys)
    assert code == 0 and "test accuracy" in captured.out


@pytest.mark.parametrize("error, advice", [(PermissionError(errno.EACCES, "Permission denied", "x/train"),
                                             "(Permission denied: x/train); make it readable, or point --data-dir"),
                                            (OSError(errno.ENOSPC, "No space left on device"),
                                             "(No space left on device); fix that, or point --data-dir")])
def test_a_data_folder_the_system_refuses_is_named_with_what_to_do(data_dir, tmp_path, capsys, monkeypatch, error,
                                                                   advice):
    # another user's folder of mode 700, or a full disk while files are fetched (root reads any folder)
    def refused(*args, **kwargs):
        raise error
    monkeypatch.setattr(training, "load_dataset", refused)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--epochs", "1", "--out-dir", str(tmp_path / "run")],
                              capsys)
    assert code == 2 and f"error: cannot use the data folder {data_dir} {advice}" in captured.err


def test_a_refused_saved_setting_is_the_checkpoint_s_even_where_its_flag_is_given_and_ignored(trained_run, tmp_path,
                                                                                              capsys):
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"]["batch_size"] = 0
    torch.save(checkpoint, path)
    # --resume keeps the run's batch size: the flag given is ignored, and the saved value is the one refused
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2", "--batch-size", "16"], capsys)
    assert code == 2 and f"the configuration saved in {path}" in captured.err and "--batch-size" in captured.err
    assert "to replace it" not in captured.err  # the command line cannot


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_saved_device_or_amp_this_machine_cannot_run_is_named_as_the_run_s(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # a run trained on a GPU under fp16; its out_dir and device are never read where the command line gives them
    checkpoint["config"].update(device="cuda", amp="fp16", out_dir=5)
    torch.save(checkpoint, path)
    for args, flag in ((["--resume", "--out-dir", str(out)], "--device"),
                       (["--resume", "--out-dir", str(out), "--device", "cpu"], "--amp"),
                       (["--eval-only", "--checkpoint", str(path)], "--amp")):
        code, captured = run_main(args, capsys)
        assert code == 2 and f"(the value saved with the run; give {flag} to replace it)" in captured.err
    code, captured = run_main(["--resume", "--out-dir", str(out), "--device", "cpu", "--amp", "off"], capsys)
    assert code == 0, captured.err
    checkpoint["config"]["device"] = ""  # --eval-only uses the command line's device, or this machine's best
    torch.save(checkpoint, path)
    code, captured = run_main(["--eval-only", "--checkpoint", str(path), "--amp", "off"], capsys)
    assert code == 0, captured.err
    del checkpoint["config"]["amp"]  # lacking a setting the command line gives is no reason to refuse
    torch.save(checkpoint, path)
    code, captured = run_main(["--eval-only", "--checkpoint", str(path)], capsys)
    assert code == 2 and "lacks amp" in captured.err and "cannot use that checkpoint without --amp" in captured.err
    code, captured = run_main(["--eval-only", "--checkpoint", str(path), "--amp", "off"], capsys)
    assert code == 0, captured.err


@pytest.mark.parametrize("key, value", [("low_res", 2.0), ("time_budget", -1.0)])
def test_a_resume_refuses_an_edited_setting_that_older_runs_lack(trained_run, tmp_path, capsys, key, value):
    # settings newer than some saved runs may be missing (test above), but where saved they are checked
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"][key] = value
    torch.save(checkpoint, path)
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 2 and f"the configuration saved in {path}" in captured.err
    assert training.flag_name(key) in captured.err


def test_eval_only_checks_the_saved_settings_the_command_line_does_not_replace(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"]["amp"] = "fp8"  # edited into a value --amp refuses
    torch.save(checkpoint, path)
    code, captured = run_main(["--eval-only", "--checkpoint", str(path)], capsys)
    assert code == 2 and "--amp must be one of" in captured.err
    code, captured = run_main(["--eval-only", "--checkpoint", str(path), "--amp", "off"], capsys)
    assert code == 0, captured.err


@pytest.mark.parametrize("img_size, patch, low, expected", [
    ((32, 32), 4, 0.5, [(16, 16), (24, 24), (32, 32)]),  # the CIFAR-10 recipe
    ((32, 32), 4, 1.0, [(32, 32)] * 3),  # off
    ((28, 20), 4, 0.5, [(12, 8), (20, 12), (28, 20)]),  # 14 x 10 and 21 x 15 px rounded down to whole patches
    ((16, 16), 8, 0.1, [(8, 8), (8, 8), (16, 16)]),  # never less than one patch
])
def test_low_res_scales_the_first_third_by_it_and_the_second_halfway(img_size, patch, low, expected):
    config = dict(low_res=low, model_config=dict(img_size=list(img_size), patch_size=patch))
    assert training.stage_sizes(config) == expected


def test_the_thirds_of_a_run_and_their_share_of_the_budget():
    shares = (0.25, 0.5625, 1.0)
    for epochs in range(1, 40):
        thirds = [training.run_third(epoch, epochs) for epoch in range(epochs)]
        counts = [thirds.count(k) for k in range(3)]
        # in order, as equal as whole epochs allow, the later the longer: the last epoch is always at full size
        assert thirds == sorted(thirds) and counts == sorted(counts) and counts[2] - counts[0] <= 1
        assert thirds[-1] == 2
        for done in range(epochs + 1):
            assert training.epochs_ahead(epochs, done, shares) == pytest.approx(
                sum(shares[third] for third in thirds[done:]))


def test_epochs_in_budget_weighs_each_third_by_its_share():
    shares = (0.25, 0.5625, 1.0)

    def seconds(epochs, done, spent, epoch_seconds):
        return spent + epoch_seconds * sum(shares[training.run_third(e, epochs)] for e in range(done, epochs))

    for budget, epoch_seconds, asked, done, spent in [(60.0, 6.0, 20, 0, 0.0), (60.0, 6.0, 33, 0, 0.0),
                                                      (100.0, 7.0, 50, 3, 10.0), (5.0, 9.0, 4, 0, 0.0),
                                                      (60.0, 6.0, 20, 2, 50.0), (3000.0, 1.0, 33, 0, 0.0)]:
        fitted = training.epochs_in_budget(budget, epoch_seconds, asked, done=done, spent=spent, shares=shares)
        # the most epochs that fit, at most those asked for and at least one more than those done
        assert done + 1 <= fitted <= asked
        assert seconds(fitted, done, spent, epoch_seconds) <= budget or fitted == done + 1
        assert all(seconds(more, done, spent, epoch_seconds) > budget for more in range(fitted + 1, asked + 1))


def record_step_sizes(monkeypatch):
    """From now on, the image sizes each epoch's training steps take: {epoch (from 0): {(height, width), ...}}."""
    sizes, train_step = {}, training.train_step

    def recording_step(run, x, y, global_step):
        sizes.setdefault(global_step // run.steps_per_epoch, set()).add(tuple(x.shape[-2:]))
        return train_step(run, x, y, global_step)

    monkeypatch.setattr(training, "train_step", recording_step)
    return sizes


def test_low_res_trains_each_third_of_the_epochs_at_its_size_and_evaluates_at_full_size(data_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    # --low-res 0.5 on the 16-px images with 4-px patches: 8 px in the first third of 6 epochs, 12 px in the
    # second, 16 px in the last; validation and the test set at 16 px throughout
    evaluated, predict = set(), training.predict

    def recording_predict(model, x, tta, shift=0, fill=0.0):
        evaluated.add(tuple(x.shape[-2:]))
        return predict(model, x, tta, shift, fill)

    sizes = record_step_sizes(monkeypatch)
    monkeypatch.setattr(training, "predict", recording_predict)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "6",
                                      "--low-res", "0.5", "--val-size", "16"], capsys)
    assert code == 0, captured.err
    assert sizes == {0: {(8, 8)}, 1: {(8, 8)}, 2: {(12, 12)}, 3: {(12, 12)}, 4: {(16, 16)}, 5: {(16, 16)}}
    assert evaluated == {(16, 16)}
    assert "epoch 1/6 at 8x8 px" in captured.out + captured.err


def test_a_resume_given_more_epochs_never_goes_back_to_a_smaller_size(data_dir, tmp_path, capsys, monkeypatch):
    # 3 epochs of --low-res 0.5 train at 8, 12 and 16 px; resumed to 9 epochs, whose thirds would put epochs 4-6 at
    # 12 px, the run goes on at the full 16 px it has reached
    sizes = record_step_sizes(monkeypatch)
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3",
                                      "--low-res", "0.5"], capsys)
    assert code == 0, captured.err
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "9"], capsys)
    assert code == 0, captured.err
    assert sizes == {0: {(8, 8)}, 1: {(12, 12)}, **{epoch: {(16, 16)} for epoch in range(2, 9)}}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["image_size"] for line in metrics] == [[8, 8], [12, 12]] + [[16, 16]] * 7


def test_the_third_reached_sets_the_smallest_size_and_the_budget_s_shares():
    config = dict(epochs=12, low_res_third=1, time_budget_fit=dict(step_shares=[0.25, 0.5, 1.0]))
    # thirds of 12 epochs start at epochs 0, 4 and 8 (from 0)
    assert [training.train_stage(config, epoch) for epoch in (0, 3, 4, 7, 8, 11)] == [1, 1, 1, 1, 2, 2]
    assert training.budget_shares(config) == (0.5, 0.5, 1.0)
    del config["low_res_third"]  # a run saved before it was kept, and every run without --low-res
    assert [training.train_stage(config, epoch) for epoch in (0, 3, 4, 7, 8, 11)] == [0, 0, 1, 1, 2, 2]
    assert training.budget_shares(config) == (0.25, 0.5, 1.0)


@pytest.mark.parametrize("third", [3, 1.0, "2"])
def test_a_resume_refuses_an_edited_third_reached(trained_run, tmp_path, capsys, third):
    out = copy_run(trained_run, tmp_path)
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"]["low_res_third"] = third
    torch.save(checkpoint, path)
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "2"], capsys)
    assert code == 2 and f"the configuration saved in {path}" in captured.err
    assert f"low_res_third {third!r} is not a third" in captured.err


def test_a_run_saved_before_the_third_reached_was_kept_resumes_from_its_last_epoch_s_third(data_dir, tmp_path,
                                                                                          capsys, monkeypatch):
    # 3 epochs of --low-res 0.5 (8, 12, 16 px), their checkpoint stripped of low_res_third as older code saved it:
    # resumed to 9 epochs, the run goes on at 16 px, the third of its last epoch of 3
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "3",
                                      "--low-res", "0.5"], capsys)
    assert code == 0, captured.err
    path = out / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint["config"]["low_res_third"]
    torch.save(checkpoint, path)
    sizes = record_step_sizes(monkeypatch)  # of the resumed epochs only
    code, captured = run_main(["--resume", "--out-dir", str(out), "--epochs", "9"], capsys)
    assert code == 0, captured.err
    assert sizes == {epoch: {(16, 16)} for epoch in range(3, 9)}


def test_resize_images_averages_rather_than_picks_pixels():
    x = torch.rand(2, 3, 16, 16)
    assert training.resize_images(x, (16, 16)) is x
    constant = training.resize_images(torch.full((1, 3, 16, 16), 0.7), (8, 8))
    torch.testing.assert_close(constant, torch.full((1, 3, 8, 8), 0.7))
    # a checkerboard of single pixels averages to grey away from the border (picking every other pixel would
    # keep it black or white)
    board = (torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2
    half = training.resize_images(board.float().expand(1, 3, 16, 16), (8, 8))
    torch.testing.assert_close(half[..., 1:-1, 1:-1], torch.full((1, 3, 6, 6), 0.5))


@pytest.mark.parametrize("slow, expected, refits, compile_seconds", [(1.0, 15, 7, 0.0), (2.0, 7, 3, 0.0),
                                                                     (1.0, 15, 7, 1.0)])
def test_a_time_budget_under_low_res_weighs_each_third_by_its_timed_steps(data_dir, tmp_path, capsys, monkeypatch,
                                                                          slow, expected, refits, compile_seconds):
    # batch 4: 24 steps an epoch. Timed steps of 0.25 s at 16 px, and at 8 and 12 px in proportion to their
    # pixels (shares 0.25 and 0.5625): a minute holds 15 of the 20 epochs asked for (5 in each third: 1.25 +
    # 2.81 + 5 full-size epochs of 6 s, 54 s), where 10 would fit at full size. Each epoch then takes `slow` times
    # its share of 6 s: at 1, the refits, which scale an epoch's pace to a full-size epoch's, keep the 15; at 2
    # the refit after the first (3 s, at 8 px: 12 s a full-size epoch) leaves 57 s for 6 more, 2 at 8 px, 2 at
    # 12 px, 3 at full size (4.375 full-size epochs, 52.5 s; 8 would need 59.25), thirds which the refits after
    # the second and third keep (the run's first half then ends). `compile_seconds` more in the first 3 steps of the
    # first epoch at 12 px (the 6th of 15; a compile of the new size, say): its refit paces it by the steps after
    # those, 6 s a full-size epoch as every other, not by the whole epoch's 4.375 s (7.8 s at full size)
    shares = {8: 0.25, 12: 0.5625, 16: 1.0}
    by_third = list(shares.values())
    first_at_12 = training.third_starts(expected)[1]
    clock_epochs(monkeypatch,
                 lambda epoch, seen: seen / 96 * 6.0 * slow * by_third[training.run_third(epoch, expected)]
                 + (compile_seconds * min(seen, 12) / 12 if epoch == first_at_12 else 0.0),
                 step=lambda size: 0.25 * shares[size[0]])
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "20",
                                      "--time-budget", "1", "--low-res", "0.5", "--warmup-epochs", "1",
                                      "--batch-size", "4"], capsys)
    assert code == 0, captured.err
    assert "0.062 / 0.141 / 0.250 s a step at 8x8 / 12x12 / 16x16 px (10 timed each)" in captured.out
    assert "-> 15 of 20 epochs, about 0:54 of training" in captured.out
    assert f"epoch 1 took {format_seconds(1.5 * slow)} (estimated 0:02" in captured.out
    assert "epochs took" not in captured.out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    thirds = [training.run_third(epoch, expected) for epoch in range(expected)]
    assert [record["seconds"] for record in metrics] == pytest.approx(
        [6.0 * slow * by_third[k] + (compile_seconds if epoch == first_at_12 else 0.0)
         for epoch, k in enumerate(thirds)])
    assert [record["image_size"] for record in metrics] == [[(8, 12, 16)[k]] * 2 for k in thirds]
    fit = json.loads((out / "config.json").read_text())["time_budget_fit"]
    assert fit["step_shares"] == pytest.approx(by_third) and fit["seconds_per_step"] == pytest.approx(0.25)
    assert [refit["pace_seconds"] for refit in fit["refits"]] == pytest.approx([6.0 * slow] * refits)
    assert [refit["epochs"] for refit in fit["refits"]] == [expected] * refits


@pytest.mark.parametrize("given, budget, fitted", [(False, 1.0, "6 of 6 epochs, about 0:36"),
                                                   (True, 1.0, "6 of 6 epochs, about 0:36"),
                                                   (False, 0.8, "6 of 6 epochs, about 0:36")])
def test_the_recipe_s_low_res_is_off_where_the_budget_holds_every_epoch_at_full_size(data_dir, tmp_path, capsys,
                                                                                      monkeypatch, given, budget,
                                                                                      fitted):
    # a GPU: the timed steps cost 0.25 s at 8, 12 and 16 px alike, 6 s an epoch of 24 steps, so a minute holds all 6
    # epochs asked for at full size; smaller images would buy none, and the run trains as one given --epochs would
    # (the same weights). A --low-res given on the command line stays, and so does the recipe's where the epochs
    # fit without the margin a machine that slows down needs (36 s of 48: over training.FULL_SIZE_SHARE)
    clock_epochs(monkeypatch, lambda epoch, seen: seen / 96 * 6.0)
    monkeypatch.setitem(training.RECIPES, "folder", dict(epochs=6, time_budget=budget, low_res=0.5))  # as CIFAR-10's
    out, fixed = tmp_path / "run", tmp_path / "fixed"
    common = TINY + ["--data-dir", data_dir, "--batch-size", "4", "--seed", "3"]
    code, captured = run_main(common + ["--out-dir", str(out)] + (["--low-res", "0.5"] if given else []), capsys)
    assert code == 0, captured.err
    assert f"-> {fitted} of training" in captured.out
    off = not given and budget == 1.0
    assert ("--low-res 0.5 is off (it would buy no epochs)" in captured.out) is off
    config = json.loads((out / "config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if not off:
        assert config["low_res"] == 0.5 and metrics[0]["image_size"] == [8, 8]
        return
    assert config["low_res"] == 1.0 and config["time_budget_fit"]["low_res_off"] == 0.5
    assert all("image_size" not in record for record in metrics)
    assert run_main(common + ["--out-dir", str(fixed), "--epochs", "6"], capsys)[0] == 0
    trained, plain = (torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
                      for folder in (out, fixed))
    assert all(torch.equal(trained[name], plain[name]) for name in plain)


def test_the_time_budget_times_the_image_sizes_in_turns(data_dir, tmp_path, capsys, monkeypatch):
    # a machine that slows by 2% with every training step while the budget times its steps at 8, 12 and 16 px (a
    # clock that advances by the pixels' share of a 16-px step times that slowdown). Timed one size after the
    # other, the 16-px steps would run about 26 steps after the 8-px ones, 1.02^26 = 1.67 times slower: a share
    # of 0.15 for 8 px where its pixels say 0.25. In turns a round's sizes run within 2 steps of each other, and
    # each size's share stays within 4% of its pixels' share (0.25 / 1.02^2 = 0.240 at 8 px)
    clock = dict(now=0.0, steps=0)
    real_step, real_seconds, timed = training.train_step, training.step_seconds, []

    def slowing_step(run, x, y, step):
        clock["steps"] += 1
        clock["now"] += (x.shape[-1] / 16) ** 2 * 1.02 ** clock["steps"]
        return real_step(run, x, y, step)

    def step_seconds(run, sizes):
        with monkeypatch.context() as patch:
            patch.setattr(training, "train_step", slowing_step)
            patch.setattr(training.time, "perf_counter", lambda: clock["now"])
            timed.append((sizes, real_seconds(run, sizes)))
        return timed[-1][1]

    monkeypatch.setattr(training, "step_seconds", step_seconds)
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--epochs", "1",
                                      "--time-budget", "1e6", "--low-res", "0.5"], capsys)
    assert code == 0, captured.err
    [(sizes, seconds)] = timed
    assert sizes == [(8, 8), (12, 12), (16, 16)]
    steps = training.BUDGET_WARMUP_STEPS + training.BUDGET_TIMED_STEPS
    assert clock["steps"] == 3 * steps  # every step of the timing went through the slowing clock
    shares = [value / seconds[-1] for value in seconds]
    assert shares == pytest.approx([0.25, 0.5625, 1.0], rel=0.045)
