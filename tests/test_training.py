"""training.py as a user meets it: run folders, exact resume, interruption, NaN stops, clear errors,
evaluation of saved checkpoints and DistributedDataParallel on CPU. Runs use a tiny image-folder
dataset written by the tests and a tiny model, so each takes seconds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "folder", "--dim", "32", "--depth", "2", "--patch-size", "4",
        "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0.5", "--crop-padding", "2",
        "--no-flip", "--image-size", "16", "--device", "cpu", "--seed", "3",
        "--amp", "off"]  # float32 on every CPU: the tests compare runs to float32 tolerances


def write_folder_dataset(root, train_per_class=48, test_per_class=16, size=16):
    """Two classes of 16x16 RGB PNGs that differ in brightness, in root/{train,test}/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(("dark", "light")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                base = 60 + 120 * label
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{index}.png"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder-data"))
    write_folder_dataset(root)
    return root


def run_main(args, capsys=None):
    code = training.main(list(args))
    return code, (capsys.readouterr() if capsys else None)


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
    common = TINY + ["--data-dir", data_dir, "--drop-path", "0.2", "--ema", "0.9", "--epochs", "3",
                     "--mixup", "0.5", "--erasing", "0.5"]
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
    result = json.loads((out / "eval.json").read_text())
    assert result["test_acc"] == pytest.approx(final["test_acc"])
    assert f"{100 * final['test_acc']:.2f}%" in captured.out


def test_a_new_run_never_overwrites_an_existing_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"])[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1"], capsys)
    assert code == 2 and "--resume" in captured.err
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--model", "vil-xxl"], "unknown model"),
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
    assert captured.err.startswith("error:") and message in captured.err


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


def test_two_processes_with_gloo_match_one_process_on_the_same_global_batch(data_dir, tmp_path):
    common = TINY + ["--data-dir", data_dir, "--epochs", "2", "--crop-padding", "0", "--ema", "0.9"]
    single = run_script(common + ["--out-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(ROOT, "training.py"), *common,
                             "--out-dir", str(tmp_path / "two")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    # the EMA too: every process starts from the same initial weights
    one, two = full_state(tmp_path / "one" / "checkpoint.pt"), full_state(tmp_path / "two" / "checkpoint.pt")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    final_one = json.loads((tmp_path / "one" / "final.json").read_text())
    final_two = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final_two["world_size"] == 2
    assert final_two["test_acc"] == pytest.approx(final_one["test_acc"], abs=1 / 32)


def test_limit_train_on_a_folder_keeps_every_class(data_dir, tmp_path, capsys):
    # folder images come sorted by class, so the first 32 are all of class 0
    out = tmp_path / "run"
    code, captured = run_main(TINY + ["--data-dir", data_dir, "--out-dir", str(out), "--epochs", "1",
                                      "--limit-train", "32"], capsys)
    assert code == 0, captured.err
    assert json.loads((out / "config.json").read_text())["num_classes"] == 2
    assert json.loads((out / "config.json").read_text())["model_config"]["img_size"] == [16, 16]


def test_amp_auto_is_bf16_on_a_cpu_with_native_bf16_and_float32_on_one_without(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.autocast_dtype("auto", cpu) == torch.bfloat16
    assert training.autocast_dtype("off", cpu) is None
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
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


def test_tta_only_where_training_flips():
    assert training.mirror_tta(dict(tta=True, flip=True), digits=False)
    assert not training.mirror_tta(dict(tta=True, flip=True), digits=True)  # digits are never mirrored
    assert not training.mirror_tta(dict(tta=True, flip=False), digits=False)
    assert not training.mirror_tta(dict(tta=False, flip=True), digits=False)
    assert not training.mirror_tta(dict(flip=True), digits=False)  # a checkpoint from before --tta


def test_progress_lines_reach_a_log_file(data_dir, tmp_path):
    result = run_script(TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("epoch 1/1 ")]
    assert progress and all("img/s" in line for line in progress), result.stderr
