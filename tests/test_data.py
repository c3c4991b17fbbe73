"""Tests of data.py: parsers, verification, downloads (against a local server only), the image folder,
and the properties of the on-device batch pipeline."""

import errno
import gzip
import hashlib
import http.client
import http.server
import inspect
import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import tarfile
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Caches go under tmp_path, never into ~; the md5 and mirror tables can be changed per test."""
    monkeypatch.setenv("VIL_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "MD5S", dict(data.MD5S))
    monkeypatch.setattr(data, "MIRRORS", {k: list(v) for k, v in data.MIRRORS.items()})
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 5.0)


def md5_of(raw):
    return hashlib.md5(raw).hexdigest()


# -----------------------------------------------------------------------------
# Tiny datasets in the real formats

def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def cifar_bytes(images, labels, label_key=b"labels"):
    batch = {b"batch_label": b"testing batch", label_key: list(map(int, labels)),
             b"data": images.reshape(len(images), -1), b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(y) // 5 for y in labels]
    return pickle.dumps(batch, protocol=2)


def tiny_files(name, n=12, seed=0):
    """{path under the root: bytes} of a tiny dataset in its real format, training and test split."""
    rng = np.random.default_rng(seed)
    if name in ("mnist", "fashion-mnist"):
        folder = "MNIST/raw" if name == "mnist" else "FashionMNIST/raw"
        files = {}
        for prefix in ("train", "t10k"):
            files[f"{folder}/{prefix}-images-idx3-ubyte.gz"] = idx_bytes(rng.integers(0, 256, (n, 28, 28)), 2051)
            files[f"{folder}/{prefix}-labels-idx1-ubyte.gz"] = idx_bytes(np.arange(n) % 10, 2049)
        return files
    if name == "cifar10":
        files = {f"cifar-10-batches-py/data_batch_{i}":
                 cifar_bytes(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10)
                 for i in range(1, 6)}
        files["cifar-10-batches-py/test_batch"] = cifar_bytes(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                                                              np.arange(n) % 10)
        files["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, 2)
        return files
    files = {f"cifar-100-python/{split}": cifar_bytes(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                                                      np.arange(n) * 7 % 100, b"fine_labels")
             for split in ("train", "test")}
    files["cifar-100-python/meta"] = pickle.dumps({b"fine_label_names": [b"f%d" % i for i in range(100)]}, 2)
    return files


def tar_gz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, raw in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


def install(root, files):
    """Write files under root and make data.MD5S expect them."""
    for rel, raw in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(raw)
        data.MD5S[rel] = md5_of(raw)


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# -----------------------------------------------------------------------------
# Parsers

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar", "cifar100"])
def test_load_dataset_reads_the_real_formats(tmp_path, name):
    canonical = data.DATASET_ALIASES.get(name, name)
    install(tmp_path, tiny_files(canonical))
    for train in (True, False):
        images, labels = data.load_dataset(name, tmp_path, train=train)
        info = data.DATASETS[canonical]
        n = 12 * (5 if canonical == "cifar10" and train else 1)
        size = 28 if info.in_chans == 1 else 32
        assert images.dtype == torch.uint8 and images.shape == (n, info.in_chans, size, size)
        assert info.image_size == size  # the table that sizes the model before any data is loaded
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert int(labels.max()) < info.num_classes


def test_cifar_planes_are_red_green_blue(tmp_path):
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 0, 0, 1], image[0, 1, 2, 3], image[0, 2, 31, 30] = 10, 20, 30
    path = tmp_path / "batch"
    path.write_bytes(cifar_bytes(image, [4]))
    images, labels = data.read_cifar_batch(path)
    assert images[0, 0, 0, 1] == 10 and images[0, 1, 2, 3] == 20 and images[0, 2, 31, 30] == 30
    assert int(images.sum()) == 60 and labels.tolist() == [4]


def test_idx_wrong_magic_truncated_and_corrupt_gzip_name_the_file(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    good = tmp_path / "good.gz"
    good.write_bytes(idx_bytes(images, 2051))
    assert torch.equal(data.read_idx(good, 2051), torch.from_numpy(images.astype(np.uint8)))

    wrong = tmp_path / "wrong-magic.gz"
    wrong.write_bytes(idx_bytes(images, 2049))
    with pytest.raises(data.DataError, match="wrong-magic.gz.*magic number is 2049, expected 2051"):
        data.read_idx(wrong, 2051)

    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(gzip.decompress(idx_bytes(images, 2051))[:-10]))
    with pytest.raises(data.DataError, match="short.gz.*truncated"):
        data.read_idx(short, 2051)

    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(data.DataError, match="cut.gz.*truncated or corrupt"):
        data.read_idx(cut, 2051)


def test_cifar_truncated_wrong_or_unsafe_pickles_name_the_file(tmp_path):
    raw = cifar_bytes(np.zeros((4, 3, 32, 32), np.uint8), [0, 1, 2, 3])
    cut = tmp_path / "cut_batch"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="cut_batch"):
        data.read_cifar_batch(cut)

    wrong_shape = tmp_path / "wrong_batch"
    wrong_shape.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, 2))
    with pytest.raises(data.DataError, match="wrong_batch.*not the right file"):
        data.read_cifar_batch(wrong_shape)

    unsafe = tmp_path / "unsafe_batch"
    unsafe.write_bytes(pickle.dumps({b"data": os.getcwd}, 2))  # a function reference: refused, never called
    with pytest.raises(data.DataError, match="unsafe_batch.*unexpected object"):
        data.read_cifar_batch(unsafe)


@pytest.mark.parametrize("name,rel", [("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
                                      ("cifar10", "cifar-10-batches-py/data_batch_3")])
def test_one_changed_byte_is_refused_with_the_path(tmp_path, name, rel):
    install(tmp_path, tiny_files(name))
    path = tmp_path / rel
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=f"{path}: md5 is"):
        data.load_dataset(name, tmp_path, train=True)


# -----------------------------------------------------------------------------
# Remembered verification

def test_verification_is_remembered_and_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    install(tmp_path, tiny_files("mnist"))
    calls = []
    real_md5 = data._md5
    monkeypatch.setattr(data, "_md5", lambda path: calls.append(path) or real_md5(path))
    data.load_dataset("mnist", tmp_path, train=True)
    assert len(calls) == 2
    assert os.path.isfile(tmp_path / ".vil-verified.json")  # a writable root keeps its own record
    data.load_dataset("mnist", tmp_path, train=True)
    assert len(calls) == 2  # nothing read again

    # same size, one byte changed, new mtime: checked again and refused
    path = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF
    path.write_bytes(bytes(raw))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz: md5 is"):
        data.load_dataset("mnist", tmp_path, train=True)
    assert len(calls) == 3


@pytest.mark.parametrize("how", ["replaced", "rewritten-in-place"])
def test_a_file_changed_with_its_size_and_mtime_kept_is_checked_again(tmp_path, how):
    # rsync -t and tar put a new file in place, cp -p rewrites the old one; all keep size and mtime
    install(tmp_path, tiny_files("mnist"))
    data.load_dataset("mnist", tmp_path, train=True)  # verified and remembered
    path = tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz"
    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    if how == "replaced":
        copy = tmp_path / "corrupt-copy"
        copy.write_bytes(bytes(raw))
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(copy, path)
    else:
        time.sleep(0.05)  # past the granularity of the kernel's clock for ctime
        path.write_bytes(bytes(raw))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(data.DataError, match=f"{path}: md5 is .*Delete it so it is downloaded again"):
        data.load_dataset("mnist", tmp_path, train=True)


@pytest.mark.parametrize("record", [b"[]", b"7", b"null", b'"verified"', b"\xff\xfe\x00\x89garbage", b"{\"a\": ",
                                    b"[" * 100_000, b'{"%(path)s": [1, 2], "%(path)s.gz": "yes", "x": {}}'],
                         ids=["list", "number", "null", "string", "binary", "cut", "deep", "bad-entries"])
def test_a_broken_verification_record_counts_as_empty_and_is_rewritten(tmp_path, monkeypatch, record):
    install(tmp_path, tiny_files("mnist"))
    path = os.path.realpath(tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz")
    (tmp_path / ".vil-verified.json").write_bytes(record.replace(b"%(path)s", path.encode()))
    calls = []
    real_md5 = data._md5
    monkeypatch.setattr(data, "_md5", lambda path: calls.append(path) or real_md5(path))
    images, _ = data.load_dataset("mnist", tmp_path, train=True)
    assert images.shape == (12, 1, 28, 28) and len(calls) == 2  # no traceback, both files checked: nothing trusted
    with open(tmp_path / ".vil-verified.json") as f:
        assert path in json.load(f)  # a good record again
    data.load_dataset("mnist", tmp_path, train=True)
    assert len(calls) == 2


def make_read_only(root):
    for folder, _, _ in os.walk(root):
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def make_writable(root):
    for folder, _, _ in os.walk(root):
        os.chmod(folder, 0o755)


def test_read_only_root_is_never_written(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    install(root, tiny_files("cifar10"))
    before = all_files(root)
    make_read_only(root)
    try:
        calls = []
        real_md5 = data._md5
        monkeypatch.setattr(data, "_md5", lambda path: calls.append(path) or real_md5(path))
        data.load_dataset("cifar10", root, train=False)
        data.load_dataset("cifar10", root, train=False)
        assert len(calls) == 1  # remembered outside the root
        assert all_files(root) == before
        assert os.path.isfile(tmp_path / "user-cache" / "verified.json")

        # a missing file in a read-only root: no download is tried, the error says why and what to do
        data.MIRRORS["mnist"] = [f"http://127.0.0.1:{closed_port()}/"]
        with pytest.raises(data.DataError, match="read-only.*copy the files into"):
            data.load_dataset("mnist", root, train=True)
        assert all_files(root) == before
    finally:
        make_writable(root)


def test_a_record_of_verified_files_that_cannot_be_written_is_reported_once(tmp_path, monkeypatch, capsys):
    # each split's files are verified on their own: the note came once per split, twice a run
    root = tmp_path / "ro"
    install(root, tiny_files("cifar10"))
    make_read_only(root)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("VIL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # no folder can be made there
    monkeypatch.setattr(data, "_UNWRITABLE_RECORDS", set())
    try:
        data.load_dataset("cifar10", root, train=True)
        data.load_dataset("cifar10", root, train=False)
    finally:
        make_writable(root)
    assert capsys.readouterr().err.count("could not remember verified files") == 1


# -----------------------------------------------------------------------------
# Downloads, against a server on 127.0.0.1 only

class TinyServer:
    """Serves {name: bytes} on 127.0.0.1; `truncate` names files sent only halfway before the connection
    closes (with the full Content-Length announced)."""

    def __init__(self, files):
        self.files, self.truncate, self.requests = dict(files), set(), []
        self.delay = 0.0  # seconds before each answer
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                raw = server.files[name]
                time.sleep(server.delay)
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw[: len(raw) // 2] if name in server.truncate else raw)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = TinyServer({})
    yield s
    s.close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_mnist(server, tmp_path):
    files = tiny_files("mnist")
    for rel, raw in files.items():
        server.files[os.path.basename(rel)] = raw
        data.MD5S[rel] = md5_of(raw)
    return files


def test_download_mnist_from_the_second_mirror(tmp_path, server):
    files = serve_mnist(server, tmp_path)
    data.MIRRORS["mnist"] = [f"http://127.0.0.1:{closed_port()}/", server.url]
    images, labels = data.load_dataset("mnist", tmp_path / "root", train=True)
    assert images.shape == (12, 1, 28, 28) and labels.tolist() == [i % 10 for i in range(12)]
    assert all_files(tmp_path / "root") == sorted([".vil-verified.json", "MNIST/raw/train-images-idx3-ubyte.gz",
                                                   "MNIST/raw/train-labels-idx1-ubyte.gz"])
    raw = (tmp_path / "root/MNIST/raw/train-images-idx3-ubyte.gz").read_bytes()
    assert raw == files["MNIST/raw/train-images-idx3-ubyte.gz"]
    server.requests.clear()
    data.load_dataset("mnist", tmp_path / "root", train=True)
    assert server.requests == []  # present files are not fetched again


def test_processes_sharing_a_data_root_download_each_file_once(tmp_path, server):
    """torchrun's processes all load the data at once: the root is locked while files are fetched, so
    each file is downloaded once and every loader gets it (two downloads at once removed each
    other's temporary file). Two threads, as flock locks separate opens of the folder apart."""
    files = serve_mnist(server, tmp_path)
    data.MIRRORS["mnist"] = [server.url]
    server.delay = 0.3  # both loaders are under way before the first file arrives
    results, errors = [], []

    def load():
        try:
            results.append(data.load_dataset("mnist", tmp_path / "root", train=True))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 2
    assert sorted(server.requests) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for rel, raw in files.items():
        if "train" in rel:
            assert (tmp_path / "root" / rel).read_bytes() == raw


def test_downloaded_and_remembered_files_are_readable_by_others(tmp_path, server):
    serve_mnist(server, tmp_path)
    data.MIRRORS["mnist"] = [server.url]
    previous = os.umask(0o022)
    try:
        data.load_dataset("mnist", tmp_path, train=True)
    finally:
        os.umask(previous)
    modes = {rel: stat.S_IMODE(os.stat(tmp_path / rel).st_mode) for rel in all_files(tmp_path)}
    assert modes == {".vil-verified.json": 0o644, "MNIST/raw/train-images-idx3-ubyte.gz": 0o644,
                     "MNIST/raw/train-labels-idx1-ubyte.gz": 0o644}


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)],
                         ids=["ctrl-c", "sigterm"])
def test_a_download_stopped_by_a_signal_leaves_nothing(tmp_path, server, monkeypatch, signum, raised):
    serve_mnist(server, tmp_path)
    data.MIRRORS["mnist"] = [server.url]

    def exit_on_sigterm(signum, frame):  # as training.py turns SIGTERM into an exception
        raise SystemExit(128 + signum)

    handler = signal.default_int_handler if signum == signal.SIGINT else exit_on_sigterm
    previous = signal.signal(signum, handler)
    real_read = http.client.HTTPResponse.read
    blocks = []

    def read_then_signal(self, amount=None):  # the signal arrives after the first 100 bytes are written
        if blocks:
            os.kill(os.getpid(), signum)
        blocks.append(real_read(self, 100))
        return blocks[-1]

    monkeypatch.setattr(http.client.HTTPResponse, "read", read_then_signal)
    try:
        with pytest.raises(raised):
            data.load_dataset("mnist", tmp_path, train=True)
    finally:
        signal.signal(signum, previous)
    assert len(blocks) >= 1 and all_files(tmp_path) == []  # no partial file, hidden or not


def test_download_cifar_archive_is_unpacked_and_removed(tmp_path, server):
    files = tiny_files("cifar10")
    server.files["cifar-10-python.tar.gz"] = tar_gz(files)
    for rel, raw in files.items():
        data.MD5S[rel] = md5_of(raw)
    data.MD5S["cifar-10-python.tar.gz"] = md5_of(server.files["cifar-10-python.tar.gz"])
    data.MIRRORS["cifar10"] = [server.url]
    images, labels = data.load_dataset("cifar", tmp_path, train=True)
    assert images.shape == (60, 3, 32, 32)
    assert all_files(tmp_path / "cifar-10-batches-py") == sorted(os.path.basename(r) for r in files)
    assert not os.path.exists(tmp_path / "cifar-10-python.tar.gz")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".extract") or f.endswith(".part")]


def test_an_archive_put_in_the_root_is_unpacked_not_downloaded(tmp_path):
    files = tiny_files("cifar100")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(tar_gz(files))
    data.MD5S["cifar-100-python.tar.gz"] = md5_of((tmp_path / "cifar-100-python.tar.gz").read_bytes())
    for rel, raw in files.items():
        data.MD5S[rel] = md5_of(raw)
    data.MIRRORS["cifar100"] = [f"http://127.0.0.1:{closed_port()}/"]
    images, labels = data.load_dataset("cifar100", tmp_path, train=False)
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [i * 7 % 100 for i in range(12)]
    assert os.path.isfile(tmp_path / "cifar-100-python.tar.gz")  # the user's copy stays


def test_an_archive_that_cannot_be_unpacked_for_want_of_room_is_not_blamed(tmp_path, monkeypatch):
    files = tiny_files("cifar100")
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(tar_gz(files))
    data.MD5S["cifar-100-python.tar.gz"] = md5_of(archive.read_bytes())
    for rel, raw in files.items():
        data.MD5S[rel] = md5_of(raw)
    real_copy = shutil.copyfileobj

    def disk_full(source, target, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(data.DataError) as refused:
        data.load_dataset("cifar100", tmp_path, train=False)
    message = str(refused.value)
    assert "No space left on device" in message and "make room there" in message and "Delete it" not in message
    assert archive.is_file()  # the archive the user provided stays, and unpacks once there is room
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert data.load_dataset("cifar100", tmp_path, train=False)[0].shape == (12, 3, 32, 32)


def test_corrupt_download_is_refused_and_nothing_is_left(tmp_path, server):
    serve_mnist(server, tmp_path)
    raw = bytearray(server.files["train-images-idx3-ubyte.gz"])
    raw[30] ^= 0xFF
    server.files["train-images-idx3-ubyte.gz"] = bytes(raw)
    data.MIRRORS["mnist"] = [server.url]
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: md5 of the download is .*discarded"):
        data.load_dataset("mnist", tmp_path, train=True)
    assert all_files(tmp_path) == []


def test_corrupt_archive_member_is_refused_and_nothing_is_left(tmp_path, server):
    files = tiny_files("cifar100")
    server.files["cifar-100-python.tar.gz"] = tar_gz(files)
    data.MD5S["cifar-100-python.tar.gz"] = md5_of(server.files["cifar-100-python.tar.gz"])
    for rel, raw in files.items():
        data.MD5S[rel] = md5_of(raw)
    data.MD5S["cifar-100-python/test"] = "0" * 32  # the archive holds a file that is not the official one
    data.MIRRORS["cifar100"] = [server.url]
    with pytest.raises(data.DataError, match="cifar-100-python/test inside it has md5"):
        data.load_dataset("cifar100", tmp_path, train=True)
    assert [f for f in all_files(tmp_path) if f != "cifar-100-python.tar.gz"] == []


def test_interrupted_download_leaves_nothing_that_passes(tmp_path, server):
    serve_mnist(server, tmp_path)
    server.truncate.add("train-images-idx3-ubyte.gz")
    data.MIRRORS["mnist"] = [server.url]
    with pytest.raises(data.DataError, match="interrupted"):
        data.load_dataset("mnist", tmp_path, train=True)
    assert "MNIST/raw/train-images-idx3-ubyte.gz" not in all_files(tmp_path)
    assert not [f for f in all_files(tmp_path) if f.endswith(".part")]
    server.truncate.clear()  # the next run downloads it whole
    images, _ = data.load_dataset("mnist", tmp_path, train=True)
    assert images.shape == (12, 1, 28, 28)


def test_a_data_root_given_one_or_two_levels_too_deep_is_told_its_parent(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(b"")  # only their place is read before the message
    for too_deep in (raw.parent, raw):
        with pytest.raises(data.DataError, match=f"so point it at {re.escape(str(tmp_path / 'data'))}$"):
            data.load_dataset("mnist", str(too_deep), train=True)
        assert not (too_deep / "MNIST").exists()  # nothing created or downloaded there


def test_no_network_error_names_the_files_the_folder_and_the_fix(tmp_path):
    data.MIRRORS["fashion-mnist"] = [f"http://127.0.0.1:{closed_port()}/"]
    with pytest.raises(data.DataError) as error:
        data.load_dataset("fashion-mnist", tmp_path, train=False)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "no network" in message and "copy the files into" in message
    assert all_files(tmp_path) == []


def test_a_data_root_that_nothing_could_be_fetched_into_leaves_no_folders(tmp_path):
    data.MIRRORS["mnist"] = [f"http://127.0.0.1:{closed_port()}/"]
    data.MIRRORS["cifar10"] = [f"http://127.0.0.1:{closed_port()}/"]
    for name in ("mnist", "cifar10"):  # a file per download, and an archive unpacked into a folder
        with pytest.raises(data.DataError, match="no network"):
            data.load_dataset(name, tmp_path / "mistyped" / "data", train=True)
        assert os.listdir(tmp_path) == []  # neither the root nor its missing parent stays
    (tmp_path / "data" / "MNIST").mkdir(parents=True)  # what existed before stays
    with pytest.raises(data.DataError, match="no network"):
        data.load_dataset("mnist", tmp_path / "data", train=True)
    assert os.listdir(tmp_path / "data") == ["MNIST"] and os.listdir(tmp_path / "data" / "MNIST") == []


# -----------------------------------------------------------------------------
# Image folder

def test_image_folder_decodes_resizes_and_caches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        for cls, size in (("cat", (40, 30)), ("dog", (20, 20))):
            os.makedirs(tmp_path / split / cls)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.{'png' if cls == 'cat' else 'jpg'}")
    images, labels = data.load_dataset("folder", tmp_path, train=True, image_size=16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    test_images, test_labels = data.load_dataset("folder", tmp_path, train=False, image_size=16)
    assert test_images.shape == (2, 3, 16, 16) and test_labels.tolist() == [0, 1]

    # decoded once: the second load reads the cache, not the images
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    again, _ = data.load_dataset("folder", tmp_path, train=True, image_size=16)
    assert torch.equal(again, images)
    monkeypatch.undo()

    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match="broken.png: cannot decode"):
        data.load_dataset("folder", tmp_path, train=True, image_size=16)
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_dataset("folder", tmp_path / "nowhere", train=True)


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    # Pillow's convert("RGB") clips 16-bit grey values at 255: a ramp over 0..65535 came out nearly all white
    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0, 257, ..., 65535: 8-bit i is 16-bit 257 i
    for split in ("train", "test"):
        for cls in ("deep", "plain"):
            os.makedirs(tmp_path / split / cls)
        Image.fromarray(ramp).save(tmp_path / split / "deep" / "ramp.png")  # 16 bits a pixel
        Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / split / "plain" / "ramp.png")
    assert Image.open(tmp_path / "train" / "deep" / "ramp.png").mode == "I;16"
    images, labels = data.load_dataset("folder", tmp_path, train=True, image_size=16)
    assert labels.tolist() == [0, 1]
    assert torch.equal(images[0], images[1])  # the 16-bit image decodes as its 8-bit twin
    assert torch.equal(images[1][0], torch.arange(256, dtype=torch.uint8).reshape(16, 16))


def test_image_folder_cache_notices_an_image_replaced_with_its_size_and_mtime_kept(tmp_path):
    os.makedirs(tmp_path / "train" / "cat")
    path = tmp_path / "train" / "cat" / "0.bmp"  # uncompressed: the same size whatever the pixels
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(path)
    before, _ = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    st = os.stat(path)
    copy = tmp_path / "copy.bmp"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, path)  # as rsync -t does
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after, _ = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    assert int(before.max()) == 10 and int(after.min()) == 200


def png_declaring(width, height):
    """A valid PNG signature and IHDR chunk declaring width x height RGB pixels, with no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def png_with_a_garbled_second_chunk():
    """A PNG of noise whose pixel data spans two IDAT chunks, the second's type garbled (a byte of it zeroed):
    Pillow stops there with a SyntaxError, not an OSError."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(png, "PNG")
    raw = bytearray(png.getvalue())
    first_idat = 8 + 12 + 13  # the signature and IHDR
    second_idat = first_idat + 12 + struct.unpack(">I", raw[first_idat:first_idat + 4])[0]
    assert raw[second_idat + 4:second_idat + 8] == b"IDAT"
    raw[second_idat + 5] = 0
    return bytes(raw)


@pytest.mark.parametrize("image", ["bomb.png", "cut.jpg", "empty.webp", "garbled.png"])
def test_image_folder_names_the_file_it_cannot_decode(tmp_path, image):
    os.makedirs(tmp_path / "train" / "cat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "good.png")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, "JPEG")
    broken = {"bomb.png": png_declaring(30000, 30000),  # 900 megapixels: Pillow's decompression-bomb limit
              "cut.jpg": jpeg.getvalue()[:40], "empty.webp": b"", "garbled.png": png_with_a_garbled_second_chunk()}
    (tmp_path / "train" / "cat" / image).write_bytes(broken[image])
    with pytest.raises(data.DataError, match=f"{tmp_path / 'train' / 'cat' / image}: cannot decode this image"):
        data.load_dataset("folder", tmp_path, train=True, image_size=8)


def test_an_image_the_system_will_not_let_us_read_is_named_as_unreadable_not_undecodable(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "train" / "cat")
    for name in ("good.png", "locked.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / name)
    locked, open_image = tmp_path / "train" / "cat" / "locked.png", Image.open

    def refusing(path, *args, **kwargs):  # another user's file of mode 600 (root reads any file)
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open_image(path, *args, **kwargs)
    monkeypatch.setattr(Image, "open", refusing)
    with pytest.raises(data.DataError, match=f"{locked}: cannot read this file \\(Permission denied\\); make it "
                                             f"readable, or remove it"):
        data.load_dataset("folder", tmp_path, train=True, image_size=8)


def test_an_image_folder_entry_that_is_no_file_is_named_not_waited_on(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "train" / "cat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "good.png")
    path = tmp_path / "train" / "cat" / "x.png"
    os.mkfifo(path)  # Image.open would wait for a writer forever: the test fails instead of hanging
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("opened a named pipe"))
    with pytest.raises(data.DataError, match=f"{path}: not a regular file, not an image; remove it"):
        data.load_dataset("folder", tmp_path, train=True, image_size=8)


def test_images_in_subfolders_of_a_class_folder_are_read_and_hidden_files_and_folders_are_not(tmp_path):
    def image(path, value):
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    cat = tmp_path / "train" / "cat"
    image(cat / "z.png", 1)
    image(cat / "2019" / "b.png", 2)  # images in subfolders at any depth belong to the class, as in ImageFolder
    image(cat / "2019" / "x.jpg" / "c.png", 3)  # a folder named like an image is a subfolder too
    image(cat / "2019-b" / "f.png", 6)  # "-" sorts before "/": this folder comes before 2019/x.jpg, not after 2019/
    image(tmp_path / "train" / "dog" / "d.png", 4)
    (cat / "._z.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # AppleDouble: undecodable, skipped
    image(cat / ".thumbnails" / "e.png", 5)  # a hidden folder is skipped, as a hidden class folder is
    os.symlink(cat, cat / "2019" / "loop")  # a link back up: read once, not forever
    os.symlink(cat / "2019" / "x.jpg", cat / "2019" / "y")  # a second path to one folder: its images once
    images, labels = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    # ImageFolder's order, by folder, then by name: cat/z.png, cat/2019/b.png, cat/2019-b/f.png, cat/2019/x.jpg/c.png,
    # dog/d.png (not a walk's depth-first order, which would read 2019-b after all of 2019)
    assert images[:, 0, 0, 0].tolist() == [1, 2, 6, 3, 4] and labels.tolist() == [0, 0, 0, 0, 1]


def test_a_class_folder_deeper_than_python_s_recursion_limit_is_read(tmp_path):
    # os.walk recursed on Python 3.11 (a RecursionError about 1000 folders down); the limit is lowered here so
    # that the tree stays short of the system's limit on a path's length
    deep = tmp_path / "train" / "cat" / os.path.join(*["d"] * 300)
    os.makedirs(deep)
    for index, folder in enumerate((deep.parent, deep)):
        Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(folder / "x.png")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 200)
    try:
        images, labels = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    finally:
        sys.setrecursionlimit(limit)
    assert images[:, 0, 0, 0].tolist() == [0, 1] and labels.tolist() == [0, 0]


@pytest.mark.parametrize("link", ["test/eel", "train/eel", "train/cat/2020", "train/cat/x.png"])
def test_a_link_to_nothing_in_an_image_folder_is_refused(tmp_path, link):
    # a class folder: it would drop its class (a model built for one class fewer, or test images unscored);
    # a folder of images in a class folder: its images, without a word
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / cls / "0.png")
    os.symlink(tmp_path / "moved", tmp_path / link)
    with pytest.raises(data.DataError, match=f"{tmp_path / link}: a link to nothing \\({tmp_path / 'moved'}: a "
                                             f"folder or file moved or deleted\\?\\); fix or remove it"):
        data.load_dataset("folder", tmp_path, train=link.startswith("train"), image_size=8)


@pytest.mark.parametrize("link", ["train/eel", "train/cat/2020"])
def test_a_link_that_cannot_be_followed_is_named_as_such(tmp_path, link):
    # a loop of links here; a link into another user's folder of mode 700 fails the same way, where the
    # target exists: not "a link to nothing"
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / cls / "0.png")
    os.symlink(tmp_path / link, tmp_path / link)
    with pytest.raises(data.DataError, match=f"{tmp_path / link}: cannot follow this link \\(Too many levels of "
                                             f"symbolic links\\); make its target readable, or remove it"):
        data.load_dataset("folder", tmp_path, train=True, image_size=8)


def test_an_image_folder_cache_that_holds_other_images_is_decoded_again(tmp_path, capsys):
    os.makedirs(tmp_path / "train" / "cat")
    for index in range(2):
        Image.fromarray(np.full((8, 8, 3), 50 * index, np.uint8)).save(tmp_path / "train" / "cat" / f"{index}.png")
    images, labels = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    [cache] = (tmp_path / "train" / ".vil-cache").iterdir()
    # each loads, but is not the folder's: one image fewer, other labels, labels of another dtype
    for other_images, other_labels in ((images[:1], labels[:1]), (images, 1 - labels), (images, labels.int())):
        torch.save({"images": other_images, "labels": other_labels}, cache)
        again, again_labels = data.load_dataset("folder", tmp_path, train=True, image_size=8)
        assert torch.equal(again, images) and torch.equal(again_labels, labels) and again_labels.dtype == torch.int64
        assert f"ignoring the cache {cache}" in capsys.readouterr().err


def test_an_image_folder_keeps_one_cache_per_image_size(tmp_path, capsys):
    os.makedirs(tmp_path / "train" / "cat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "0.png")
    data.load_dataset("folder", tmp_path, train=True, image_size=8)
    data.load_dataset("folder", tmp_path, train=True, image_size=16)
    caches = tmp_path / "train" / ".vil-cache"
    assert len(list(caches.iterdir())) == 2  # one per size
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "1.png")  # the folder changes
    images, _ = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    assert len(images) == 2 and len(list(caches.iterdir())) == 2  # the 8-px cache replaced, the 16-px one kept
    capsys.readouterr()
    again, _ = data.load_dataset("folder", tmp_path, train=True, image_size=8)
    assert torch.equal(again, images) and "decoding" not in capsys.readouterr().err  # read from the cache left


def test_a_test_split_is_read_with_given_class_names_without_a_train_folder(tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "test" / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / cls / "0.png")
    images, labels = data.load_dataset("folder", tmp_path, train=False, image_size=8, classes=["bird", "cat", "dog"])
    assert labels.tolist() == [1, 2] and images.shape == (2, 3, 8, 8)
    with pytest.raises(data.DataError, match="no such folder"):  # without the names, train/ gives them
        data.load_dataset("folder", tmp_path, train=False, image_size=8)


def test_a_training_class_folder_without_images_is_refused_and_a_test_split_without_a_class_noted(tmp_path, capsys):
    for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat")):
        os.makedirs(tmp_path / split / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / cls / "0.png")
    os.makedirs(tmp_path / "train" / "bird")  # empty: it would be a class that never occurs
    with pytest.raises(data.DataError, match="class folder.s. bird hold no images"):
        data.load_dataset("folder", tmp_path, train=True, image_size=8)
    os.rmdir(tmp_path / "train" / "bird")
    assert data.load_dataset("folder", tmp_path, train=True, image_size=8)[1].tolist() == [0, 1]
    capsys.readouterr()
    assert data.load_dataset("folder", tmp_path, train=False, image_size=8)[1].tolist() == [0]  # no dog to test
    assert "has no images of the class(es) dog; they go unscored" in capsys.readouterr().err


def test_split_train_val_is_disjoint_complete_and_seeded():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100)
    train_x, train_y, val_x, val_y = data.split_train_val(images, labels, 10, seed=3)
    assert len(val_y) == 10 and len(train_y) == 90
    assert sorted(train_y.tolist() + val_y.tolist()) == list(range(100))
    assert torch.equal(train_x.view(-1).long(), train_y)
    assert torch.equal(data.split_train_val(images, labels, 10, seed=3)[3], val_y)
    assert not torch.equal(data.split_train_val(images, labels, 10, seed=4)[3], val_y)
    assert len(data.split_train_val(images, labels, 0.2, seed=0)[3]) == 20
    with pytest.raises(ValueError):
        data.split_train_val(images, labels, 100, seed=0)


# -----------------------------------------------------------------------------
# The pipeline

N = 64


def numbered_images(size=16, channels=3, seed=0):
    """N images with values 1..255 (so zero fill is visible) and label i for image i."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(1, 256, (N, channels, size, size), dtype=np.uint8))
    return images, torch.arange(N)


def raw_loader(augment, batch_size=N, train=True, **kwargs):
    """A loader with mean 0 and std 1, so x * 255 gives back the pixel values."""
    images, labels = kwargs.pop("data", numbered_images())
    channels = images.shape[1]
    return images, data.DeviceLoader(images, labels, batch_size, num_classes=N, mean=(0.0,) * channels,
                                     std=(1.0,) * channels, train=train, augment=augment, **kwargs)


def test_eval_batches_keep_order_and_normalise():
    images, labels = numbered_images()
    info = data.DATASETS["cifar10"]
    loader = data.DeviceLoader(images, labels, 24, num_classes=N, mean=info.mean, std=info.std, train=False)
    batches = list(loader.epoch(0))
    assert len(loader) == 3 and [len(y) for _, y in batches] == [24, 24, 16]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)


def test_no_augmentation_is_identity_and_epochs_are_permutations():
    images, loader = raw_loader(data.Augment(), batch_size=16)
    seen = []
    for x, y in loader.epoch(0):
        assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal((x * 255).round().to(torch.uint8), images[y])
        seen += y.tolist()
    assert sorted(seen) == list(range(N)) and seen != list(range(N))  # every image once, shuffled
    assert [y.tolist() for _, y in loader.epoch(1)] != [y.tolist() for _, y in loader.epoch(0)]


def test_flip_is_a_flip():
    images, loader = raw_loader(data.Augment(flip=True))
    x, y = next(loader.epoch(0))
    out = (x * 255).round().to(torch.uint8)
    same = (out == images[y]).flatten(1).all(1)
    flipped = (out == images[y].flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54


def test_crop_moves_pixels_and_keeps_the_rest():
    images, loader = raw_loader(data.Augment(crop_padding=4))
    x, y = next(loader.epoch(0))
    out = (x * 255).round().to(torch.uint8)
    shifts = []
    for image, original in zip(out, images[y]):
        padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(image, padded[:, 4 - dy: 20 - dy, 4 - dx: 20 - dx])]
        assert len(found) == 1  # exactly a translation, zero-filled where it uncovers
        shifts += found
    assert len(set(shifts)) > 20


def test_digits_are_padded_to_32():
    images = torch.randint(1, 256, (N, 1, 28, 28), dtype=torch.uint8)
    info = data.DATASETS["mnist"]
    assert info.padded and info.digits
    _, loader = raw_loader(data.Augment(), train=False, data=(images, torch.arange(N)), pad_to=32)
    x, _ = next(loader.epoch(0))
    assert x.shape == (N, 1, 32, 32)
    assert float(x[:, :, 2:30, 2:30].min()) > 0 and float(x[:, :, :2].abs().sum() + x[:, :, :, 30:].abs().sum()) == 0


@pytest.mark.parametrize("op", data.POLICY_OPS)
def test_each_policy_op_keeps_range_and_changes_images(op):
    x = torch.rand(8, 3, 16, 16) * 0.8 + 0.1
    magnitude, sign = torch.full((8,), 0.9), torch.tensor([1.0, -1.0] * 4)
    if op in data._GEOMETRIC:
        out = data._geometric(x, torch.full((8,), data._GEOMETRIC.index(op)), magnitude, sign)
    else:
        out = data._COLOUR[op](x, magnitude, sign)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, x) == (op == "identity")


def test_affine_grid_matches_torch_and_translate_shifts_whole_pixels():
    theta = torch.randn(4, 2, 3)
    torch.testing.assert_close(data._affine_grid(theta, 12, 20), torch.nn.functional.affine_grid(
        theta, (4, 1, 12, 20), align_corners=False), rtol=1e-5, atol=1e-6)
    x = torch.rand(2, 3, 20, 20)
    # translate_x at magnitude 4/9 moves by 0.45 * 4/9 * 20 = 4 pixels, the sign giving the direction
    out = data._geometric(x, torch.tensor([2, 2]), torch.full((2,), 4 / 9), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out[0, :, :, :16], x[0, :, :, 4:])
    torch.testing.assert_close(out[1, :, :, 4:], x[1, :, :, :16])
    assert float(out[0, :, :, 16:].abs().max()) < 1e-5 and float(out[1, :, :, :4].abs().max()) < 1e-5


def test_pixel_ops_match_pillow():
    rng = np.random.default_rng(0)
    pixels = rng.integers(30, 200, (16, 16, 3), dtype=np.uint8)
    pixels[:4] = rng.integers(0, 90, (4, 16, 3), dtype=np.uint8)  # a skewed histogram
    image = Image.fromarray(pixels)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255

    def as_uint8(t):
        return (t[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    assert np.array_equal(as_uint8(data._equalize(x)), np.asarray(ImageOps.equalize(image)))
    # Pillow truncates where we round: at most one level apart
    autocontrast = as_uint8(data._autocontrast(x)).astype(int)
    assert np.abs(autocontrast - np.asarray(ImageOps.autocontrast(image))).max() <= 1
    posterized = data._COLOUR["posterize"](x, torch.tensor([0.5]), torch.ones(1))  # 8 - 2 = 6 bits
    assert np.array_equal(as_uint8(posterized), np.asarray(ImageOps.posterize(image, 6)))
    solarized = data._COLOUR["solarize"](x, torch.tensor([0.5]), torch.ones(1))
    assert np.abs(as_uint8(solarized).astype(int) - np.asarray(ImageOps.solarize(image, 128))).max() <= 1


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_policies_keep_shape_and_range(policy):
    images, loader = raw_loader(data.Augment(policy=policy, policy_magnitude=15))
    x, y = next(loader.epoch(0))
    assert x.shape == (N, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    changed = ((x * 255).round().to(torch.uint8) != images[y]).flatten(1).any(1)
    assert float(changed.float().mean()) > 0.75  # some may draw only identity


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_policy_applied_batch_wide_equals_the_policy_applied_to_the_groups_that_drew_each_op(policy):
    # the GPU's path (every op on the whole batch, kept by torch.where: no host sync) against the CPU's
    x = torch.randint(0, 256, (N, 3, 16, 16)).float() / 255
    augment = data.Augment(policy=policy, policy_ops=3, policy_magnitude=15)
    for seed in range(3):
        grouped = data._policy(x.clone(), augment, torch.Generator().manual_seed(seed), batch_wide=False)
        wide = data._policy(x.clone(), augment, torch.Generator().manual_seed(seed), batch_wide=True)
        assert torch.equal(wide, grouped) and not torch.equal(wide, x)


def test_random_erasing_blanks_one_rectangle():
    images, loader = raw_loader(data.Augment(erasing_prob=1.0))
    x, y = next(loader.epoch(0))
    out = (x * 255).round().to(torch.uint8)
    for image, original in zip(out, images[y]):
        erased = (image == 0).all(0)  # originals have no zeros
        rows, cols = erased.any(1).nonzero().squeeze(1), erased.any(0).nonzero().squeeze(1)
        assert len(rows) and int(erased.sum()) == len(rows) * len(cols)  # one rectangle
        assert 0.015 < float(erased.float().mean()) < 0.40
        assert torch.equal(image[:, ~erased], original[:, ~erased])


def test_mixup_targets_sum_to_one_and_match_the_blend():
    images, loader = raw_loader(data.Augment(mixup_alpha=1.0))
    x, y = next(loader.epoch(0))
    assert y.shape == (N, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(N))
    for image, target in zip(x, y):
        weights, sources = target.topk(2)
        torch.testing.assert_close(image, (weights[:, None, None, None] * images[sources].float() / 255).sum(0))


def test_cutmix_pastes_a_box_in_proportion_to_its_target():
    images, loader = raw_loader(data.Augment(cutmix_alpha=1.0))
    x, y = next(loader.epoch(0))
    torch.testing.assert_close(y.sum(1), torch.ones(N))
    out = (x * 255).round().to(torch.uint8)
    for image, target in zip(out, y):
        weights, sources = target.topk(2)
        first = (image == images[sources[0]]).all(0)
        second = (image == images[sources[1]]).all(0) & ~first
        assert bool((first | second).all())
        assert abs(float(second.float().mean()) - float(weights[1])) < 1e-6


def test_every_augmentation_shapes_dtype_range_and_determinism():
    images, labels = numbered_images(size=32)
    info = data.DATASETS["cifar10"]
    every_augmentation = data.Augment(crop_padding=4, flip=True, policy="randaugment", erasing_prob=0.25,
                                      mixup_alpha=0.8, cutmix_alpha=1.0)

    def loader(seed):
        return data.DeviceLoader(images, labels, 16, num_classes=N, mean=info.mean, std=info.std, train=True,
                                 augment=every_augmentation, seed=seed)

    batches = list(loader(0).epoch(2))
    low = (0 - torch.tensor(info.mean)) / torch.tensor(info.std)
    high = (1 - torch.tensor(info.mean)) / torch.tensor(info.std)
    for x, y in batches:
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16, N)
        assert bool((x >= low.view(1, 3, 1, 1) - 1e-5).all() and (x <= high.view(1, 3, 1, 1) + 1e-5).all())
    again = list(loader(0).epoch(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(loader(1).epoch(2))
    assert not torch.equal(batches[0][0], other[0][0])
    resumed = list(loader(0).epoch(2, start_step=2))
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[2:]))


def test_shards_are_disjoint_and_complete():
    images, labels = numbered_images()
    for train in (True, False):
        loaders = [raw_loader(data.Augment(), batch_size=5, train=train, rank=r, world_size=3)[1] for r in range(3)]
        if train:
            assert [len(loader) for loader in loaders] == [4, 4, 4]  # 21 per rank, drop the last partial batch
        shards = [torch.cat([y for _, y in loader.epoch(1)]).tolist() for loader in loaders]
        flat = sum(shards, [])
        assert len(flat) == len(set(flat))
        if not train:
            assert sorted(flat) == list(range(N))
    # training with batch 1: every rank sees its whole shard, together all but the N % world_size rest
    loaders = [raw_loader(data.Augment(), batch_size=1, rank=r, world_size=4)[1] for r in range(4)]
    flat = sum((torch.cat([y for _, y in loader.epoch(0)]).tolist() for loader in loaders), [])
    assert sorted(flat) == list(range(N))


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="policy"):
        data.Augment(policy="autoaugment")
    for field, value, condition in [("erasing_prob", 1.5, "0 <= erasing_prob <= 1"),
                                    ("crop_padding", -1, "crop_padding >= 0"),
                                    ("mixup_alpha", float("nan"), "mixup_alpha finite"),
                                    ("cutmix_alpha", float("inf"), "cutmix_alpha finite"),
                                    ("policy_magnitude", float("nan"), "0 <= policy_magnitude <= 30")]:
        with pytest.raises(ValueError, match=f"need {re.escape(condition)}"):
            data.Augment(**{field: value})
    with pytest.raises(ValueError, match="no full batch"):
        raw_loader(data.Augment(), batch_size=N + 1)


# -----------------------------------------------------------------------------
# The real files, where this machine has them

real = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="no ../shared/data on this machine")


@real
@pytest.mark.parametrize("name,train,count,per_class", [
    ("mnist", True, 60000, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    ("mnist", False, 10000, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    ("cifar10", True, 50000, [5000] * 10),
    ("cifar10", False, 10000, [1000] * 10),
])
def test_real_files(name, train, count, per_class, tmp_path):
    before = {f: os.stat(os.path.join(SHARED_DATA, f)).st_mtime_ns for f in all_files(SHARED_DATA)}
    images, labels = data.load_dataset(name, SHARED_DATA, train=train)
    size = 28 if name == "mnist" else 32
    assert images.shape == (count, data.DATASETS[name].in_chans, size, size) and images.dtype == torch.uint8
    assert data.DATASETS[name].image_size == size  # the table that sizes the model before any data is loaded
    assert torch.bincount(labels).tolist() == per_class
    # nothing written into the shared folder; the verification is remembered in the user cache
    after = {f: os.stat(os.path.join(SHARED_DATA, f)).st_mtime_ns for f in all_files(SHARED_DATA)}
    assert after == before
    assert os.path.isfile(tmp_path / "user-cache" / "verified.json")


@real
def test_real_md5s():
    checked = [rel for rel in all_files(SHARED_DATA) if rel in data.MD5S]
    assert len(checked) == 11  # 4 MNIST files, 7 CIFAR-10 files
    for rel in checked:
        assert data._md5(os.path.join(SHARED_DATA, rel)) == data.MD5S[rel], rel


@real
def test_real_mean_std_match_the_table():
    for name in ("mnist", "cifar10"):
        images, _ = data.load_dataset(name, SHARED_DATA, train=True)
        mean, std = data.channel_mean_std(images)
        assert np.allclose(mean, data.DATASETS[name].mean, atol=2e-3)
        assert np.allclose(std, data.DATASETS[name].std, atol=2e-3)


def test_a_data_root_made_for_a_lock_that_was_interrupted_goes_again(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while waiting for another run's lock on the root
    monkeypatch.setattr(data.fcntl, "flock", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("mnist", tmp_path / "new" / "data", train=True)
    assert os.listdir(tmp_path) == []
