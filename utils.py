"""Small helpers of training.py, some shared with bench.py (user errors, the device, autocast, the allocator
setting): user-facing errors, atomic files, checkpoints, the device, autocast, the allocator setting, distributed
setup, Ctrl-C and SIGTERM, the learning-rate schedule, a weight EMA, a progress bar and the curves plot."""
import contextlib
import ctypes
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import signal
import sys
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (a flag, a path, a file). Printed as one line, exit code 2."""


def derive_seed(*parts):
    """A 48-bit seed that depends on every part (unlike sums or Python's hash, stable across runs
    and machines): derive_seed("augment", seed, epoch, step, rank)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=6).digest(), "big")


# ----------------------------------------------------------------------------- files

def atomic_write(path, write_fn):
    """Write a file through write_fn(file_object) into a temporary file `.<name>.<8 random>.tmp`
    beside `path`, then rename it over `path`, so a crash, Ctrl-C or SIGKILL never leaves a
    half-written file under that name. The file gets the permissions of a plain open() (0o666
    less the umask, or the folder's default ACL), so others can read it where they can read
    the folder.

    One writer per path is assumed (training.py locks its run folder): the temporary files of
    `path` that a killed writer left behind are removed first, and with them those of any
    other writer of the same path at the same time."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")  # mkstemp's names too
    for entry in os.listdir(folder):
        if temporary.fullmatch(entry):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: no harm
                os.remove(os.path.join(folder, entry))
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            # O_EXCL with mode 0o666, where the kernel applies the umask: mkstemp would give 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    # the new name is on disk once the folder is; not every filesystem can fsync a folder
    with contextlib.suppress(OSError):
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def save_checkpoint(obj, path):
    """torch.save(obj) to path, atomically; a failed write (a full disk, say) raises OSError."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as error:  # torch's zip writer reports a write that failed as a RuntimeError
            if "inline_container" not in str(error) and "PytorchStreamWriter" not in str(error):
                raise
            raise OSError(errno.EIO, f"the write failed: is the disk full? (torch: {str(error)[:120]})") from error

    atomic_write(path, write)


def json_values(obj):
    """obj with every NaN or infinite float as None: JSON has no such numbers (json.dumps would write a NaN
    that strict readers refuse)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: json_values(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_values(value) for value in obj]
    return obj


def json_text(obj, indent=None):
    """obj as strict JSON text: a NaN or infinite number as null."""
    return json.dumps(json_values(obj), indent=indent, allow_nan=False)


def save_json(obj, path):
    """obj as indented JSON (json_text), atomically."""
    atomic_write(path, lambda f: f.write((json_text(obj, indent=2) + "\n").encode()))


def load_checkpoint(path):
    """Load a checkpoint written by save_checkpoint onto the CPU. Raises UserError when the file
    is missing or is not a readable checkpoint (truncated, corrupt, or some other file)."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give the checkpoint file in it ({os.path.join(path, 'checkpoint.pt')} "
                        f"or best.pt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        damaged = _damaged_record(path)
        # weights_only: a checkpoint is plain tensors, numbers and strings; never unpickle code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True) if damaged is None else None
    except Exception as error:
        if isinstance(error, OSError) and error.errno is not None:  # the file system's refusal, not the file's bytes
            raise UserError(f"cannot read checkpoint {path} ({error.strerror}); make it readable, or use a copy of it")
        # torch's text for a file that is not plain tensors suggests weights_only=False, which would run any code
        # the file holds, and a KeyError's is a byte of the file (a text file's, say): the type alone
        detail = "" if isinstance(error, (pickle.UnpicklingError, KeyError)) else f": {error_text(error)}"
        raise UserError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a "
                        f"checkpoint of this project ({type(error).__name__}{detail})")
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged: its record {damaged} fails its CRC check (a disk or copy "
                        f"error?); use another copy of it (or the run's best.pt, where it has one)")
    required = {"model": dict, "config": dict, "epoch": int}
    if not isinstance(checkpoint, dict) or not all(isinstance(checkpoint.get(key), kind)
                                                   for key, kind in required.items()) \
            or isinstance(checkpoint["epoch"], bool) or checkpoint["epoch"] < 0:  # True is an int too
        needs = ", ".join(f"{key} ({kind.__name__})" for key, kind in required.items()) + " of 0 or more"
        raise UserError(f"{path} is not a vision-lstm checkpoint: it needs a {needs}, and lacks one or holds "
                        f"another kind of value")
    ema = checkpoint.get("ema")
    for kind, weights in (("weight", checkpoint["model"]), ("EMA weight", isinstance(ema, dict) and ema.get("shadow"))):
        name = first_non_finite(weights) if isinstance(weights, dict) else None
        if name is not None:
            # training.py stops a run whose weights diverge before it saves them
            raise UserError(f"{path} holds a non-finite (nan or inf) {kind}, {name}; training.py never saves such "
                            f"weights, so the file was changed after it was saved: use a copy made before that, or "
                            f"train the run again")
    return checkpoint


def first_non_finite(weights):
    """The name of the first floating-point tensor in weights (a state dict) that holds a nan or inf, or None."""
    for name, value in weights.items():
        if torch.is_tensor(value) and value.is_floating_point():
            value = value.float() if value.element_size() == 1 else value  # isfinite has no float8 kernel
            if not bool(torch.isfinite(value).all()):
                return name
    return None


def _damaged_record(path):
    """The name of the first record of the zip file torch.save wrote at path whose bytes fail their CRC-32
    (torch.load does not check them: damaged bytes would load as garbage or NaN weights), or None. Legacy
    (pre-zip) files and files saved without CRCs (torch's compute_crc32 off) have none to check."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() if any(record.CRC for record in archive.infolist()) else None


def ensure_writable_dir(path, names=()):
    """Create `path` if needed and check that files can be written there (OSError if not), under the
    temporary name atomic_write would give the longest of `names`: a path near the system's limit on
    a path's length fails here, not at the first file a run saves."""
    os.makedirs(path, exist_ok=True)
    longest = max(names, key=len, default="")
    with tempfile.NamedTemporaryFile(dir=os.path.abspath(path), prefix=f".{longest}.", suffix=".tmp"):
        pass  # a name atomic_write's sweep removes, were this process killed before it did


# ----------------------------------------------------------------------------- distributed

DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)


def resolve_device(name):
    """A device name for torch.device: name, or the best device for None (cuda when present, else cpu);
    a UserError for one this machine does not have."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no usable CUDA GPU; "
                        "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported: use cpu or cuda")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UserError(f"--device {name}: the CPU is one device; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"numbered from 0")
    return name


def setup_distributed(device_name):
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set).
    Returns (rank, world_size, device). One process: (0, 1, device_name)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} of this machine, which has "
                            f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node={torch.cuda.device_count()} "
                            f"or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # the others wait in a collective while process 0 downloads and decodes the data, which can take
    # longer than the default timeout (10 minutes for NCCL)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return rank, world_size, device


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes (identity for one process)."""
    return _all_reduce(values, device, "SUM")


def all_reduce_max(values, device):
    """The largest of each float in a list over all processes (identity for one process)."""
    return _all_reduce(values, device, "MAX")


def _all_reduce(values, device, op):
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


# ----------------------------------------------------------------------------- signals

class StopRequests:
    """What Ctrl-C (SIGINT) and SIGTERM do during a run (installed by stop_requests).

    Inside in_loop() (the training loop, which reads `requested` at every step) the first signal,
    and a second one (a key pressed twice), only set `requested`: the loop saves a checkpoint and
    stops at its next check. Elsewhere (loading data, the final evaluation), and at a third signal
    (a run that seems stuck), a signal raises KeyboardInterrupt, so that the code that reports an
    interruption runs either way. Inside deferred() (run files being written) that
    KeyboardInterrupt waits until the block is done: it never cuts a checkpoint short."""

    def __init__(self):
        self.requested = False
        self.signals = 0
        self._in_loop, self._deferring, self._pending = False, 0, False

    def handle(self, signum, frame):
        self.signals += 1
        if self._in_loop and self.signals < 3:
            self.requested = True
        elif self._deferring:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def in_loop(self):
        self._in_loop = True
        try:
            yield
        finally:
            self._in_loop = False

    @contextlib.contextmanager
    def deferred(self):
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_requests():
    """SIGINT and SIGTERM go to a StopRequests (yielded) until the block ends, when the previous
    handlers return. So SIGTERM ends a run as Ctrl-C does, with a message, not silently."""
    stop = StopRequests()
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


# ----------------------------------------------------------------------------- optimisation

# where Linux lists the CPU's flags, read where torch has no probes of its own
CPUINFO = "/proc/cpuinfo"


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16 autocast
    trains faster than float32. CPUs without it emulate bf16 and run slower than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [probe for probe in probes if probe is not None]  # private helpers of torch.cpu, from torch 2.4 on
    if probes:
        return any(probe() for probe in probes)
    try:  # torch 2.3: the flags the kernel lists ("flags : ... avx512_bf16 ... amx_bf16 ..."), none elsewhere
        with open(CPUINFO, errors="replace") as file:
            flags = {flag for line in file if line.startswith("flags") for flag in line.partition(":")[2].split()}
    except OSError:
        return False
    return not flags.isdisjoint({"avx512_bf16", "amx_bf16"})


def has_native_bf16(device):
    """Whether bf16 autocast runs natively on device (a torch.device), where it trains faster than float32: a GPU
    from Ampere (compute capability 8) on, or a CPU with AVX512-BF16 or AMX (cpu_has_native_bf16)."""
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported() also counts the emulated bf16 of older GPUs, slower than float32
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_native_bf16()


def allow_tf32(device):
    """On a GPU, let float32 matmuls (all of them under --amp off) run in TF32 on the tensor cores:
    several times faster, with a 10-bit mantissa (bf16 has 7). Convolutions do already."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def keep_freed_memory():
    """Keep the memory this process frees for its next allocations (glibc malloc on Linux; elsewhere
    nothing is changed). Returns whether the setting was applied.

    A training step frees and re-allocates the same large activations at every step. By default glibc
    hands blocks above its mmap threshold, and free memory at the top of its heap, back to the system,
    so the next tensor of that size starts on fresh pages: a page fault for every 4 KiB it touches
    (vil-1m at bf16 batch 256 on a 2-core AMD EPYC: 28,000 to 47,000 per step, 45 to 77 ms of system
    time, against under 1,700 and 3 ms with this setting; 5-10% more images/s). Here the threshold is set
    to its largest value (32 MiB: larger tensors are still mapped and returned) and trimming is switched
    off; the resident memory then stays near the step's peak between steps.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no mallopt in this process (not glibc)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# autocast dtypes by name: training's --amp (its "off" is "fp32") and bench.py's --dtypes
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: full precision


def autocast(device, dtype):
    """Autocast to `dtype` on `device`; a no-op context when dtype is None (full precision)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def out_of_memory(error):
    """Whether an exception is an allocation that failed: on a GPU, or in the CPU's allocator."""
    return (isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))
            # torch's CPU allocator raises a RuntimeError: Linux's message, then Windows'
            or "can't allocate memory" in str(error) or "not enough memory" in str(error))


def synchronize(device):
    """Wait for the work queued on a GPU (timing it); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up over warmup_steps, base_lr / warmup_steps at step 0 up to base_lr at the last of them (a
    first step at 0 would do nothing), then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class WeightEMA:
    """Exponential moving average of a model's parameters and floating-point buffers, kept in float32; integer
    and bool buffers (a step count, a mask) are copied as they are, not averaged.
    Evaluating the averaged weights usually gains a little accuracy at the end of a run. The decay
    warms up as min(decay, (1 + updates) / (10 + updates)), so that a short run does not average
    in its random initialisation."""

    def __init__(self, model, decay):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: value.detach().clone().float() if value.is_floating_point() else value.detach().clone()
                       for name, value in model.state_dict().items()}
        self.model, self.averaged, self.copied = None, None, None  # the tensors update() reads, listed once per model

    @torch.no_grad()
    def update(self, model):
        if model is not self.model:
            # state_dict() walks every module, too slow for every step; its tensors share storage
            # with the parameters and buffers, so one list serves as long as the model is not moved
            # to another device or dtype
            state = model.state_dict()
            floats = [name for name, value in state.items() if value.is_floating_point()]
            self.model = model
            self.averaged = [self.shadow[name] for name in floats], [state[name] for name in floats]
            self.copied = [(self.shadow[name], value) for name, value in state.items() if name not in floats]
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averages, current = self.averaged
        torch._foreach_lerp_(averages, [value.float() for value in current], 1.0 - decay)
        for kept, value in self.copied:
            kept.copy_(value)

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def copy_to(self, model):
        model.load_state_dict(self.shadow)  # copied into each tensor in that tensor's dtype


# ----------------------------------------------------------------------------- reporting

def format_seconds(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def error_text(error, limit=200):
    """An exception's text on one line (torch's can span several: one per mismatched tensor of a state dict),
    cut at `limit` characters with "..."."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def counted(number, noun):
    """'1 epoch', '3 epochs': a count and its noun, singular for one."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


class ProgressBar:
    """Progress within an epoch, on stderr. On a terminal one self-rewriting line, updated every
    call; otherwise (output sent to a log file) a plain line at every tenth of the epoch, so that
    a long run's log shows it is alive. The caller prints a summary line per epoch either way.
    first: the steps done before this bar began (a resumed epoch's), which the time left is not paced by."""

    def __init__(self, total, prefix, enabled, stream=None, first=0):
        self.total, self.prefix, self.first = total, prefix, first
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = self.stream.isatty()
        self.start = time.perf_counter()
        self.next_line = 1  # the tenth of the epoch whose end prints the next plain line

    def update(self, done, loss, accuracy, images_per_second):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(done - self.first, 1) * (self.total - done)
        status = (f"{done}/{self.total} loss {loss:.4f} acc {100 * accuracy:.2f}% "
                  f"{images_per_second:.0f} img/s left {format_seconds(left)}")
        if self.terminal:
            width = 24
            filled = int(width * done / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.prefix} [{bar}] {status}  ")
            self.stream.flush()
            return
        if done < self.total and done * 10 >= self.next_line * self.total:
            self.next_line = done * 10 // self.total + 1
            self.stream.write(f"{self.prefix} {status}\n")
            self.stream.flush()

    def close(self):
        if self.enabled and self.terminal:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()


_noted_missing_matplotlib = False


def plot_curves(history, path):
    """Draw loss and accuracy per epoch from metrics.jsonl records into a PNG. Without matplotlib
    there is no plot, and a note says so once per process."""
    global _noted_missing_matplotlib
    try:
        import matplotlib
    except ImportError:
        if not _noted_missing_matplotlib:
            _noted_missing_matplotlib = True
            print(f"note: matplotlib is not installed, so {os.path.basename(path)} is not drawn "
                  f"(pip install matplotlib); the metrics are in metrics.jsonl", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        if all(f"{split}_loss" in record for record in history):
            loss_axis.plot(epochs, [record[f"{split}_loss"] for record in history], marker="o", label=split)
            accuracy_axis.plot(epochs, [100 * record[f"{split}_acc"] for record in history], marker="o", label=split)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)
