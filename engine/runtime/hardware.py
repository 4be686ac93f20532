"""The one place that decides where and in which precision the model runs.

Everything else asks the model for its device; nothing else probes the hardware.
The rules, and why:

* CUDA first, then Apple's MPS, then the CPU.
* On CUDA, bf16 autocast where the GPU has bf16 tensor cores (compute capability 8.0,
  Ampere, and newer): same range as fp32, so no loss scaling is needed. Older GPUs (V100
  is 7.0, T4 7.5) get fp16 autocast with a GradScaler, because fp16's narrow range
  underflows small gradients. The capability is asked of the GPU that trains, not of
  ``torch.cuda.is_bf16_supported()``: since PyTorch 2.6 that answers True wherever bf16
  can be emulated, sm70/sm75 included, where it runs without tensor cores.
* On CUDA from capability 8.0, fp32 matrix products run in TF32 (10-bit mantissa, fp32
  range and sums) on the tensor cores: what ``--precision fp32`` would otherwise compute
  several times slower, and what autocast leaves in fp32.
* On the CPU, bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX: the
  compact model trained 1.5x faster than in fp32, and in the same 165 s reached 2.21
  against 2.26 validation bits/byte, each evaluated in its own precision); otherwise
  fp32, because CPUs without it emulate bf16 and run it tens of times slower.
* Generating on the CPU computes in fp32, and reads the weight matrices in fp16 where
  PyTorch has the kernel for it: one token at a time, a step costs what reading the
  weights costs, and half the bytes about doubled tokens/s. ``--precision fp32`` keeps
  everything in fp32 (exact, slower).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, replace

import torch

from engine.model.config import ModelConfig
from engine.model.products import half_products_work

# (minimum accelerator memory in GiB, name, d_model, n_layer, n_head), largest first.
# The minimums are what cards sold by the GB report in GiB, less the memory the driver
# keeps: a "24 GB" RTX 4090 or 3090 reports ~23.6 GiB, a 12 GB card ~11.7, an 8 GB
# card ~7.8 (an 80 GB H100 79.1). Compared against 24/12/8, each fell one preset short.
PRESETS = [
    (22.0, "large", 1024, 12, 16),
    (11.0, "medium", 768, 8, 12),
    (7.0, "standard", 512, 6, 8),
    (0.0, "compact", 256, 4, 4),
]
PRESET_NAMES = [p[1] for p in PRESETS]


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and how the forward pass is cast."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None means plain fp32
    use_grad_scaler: bool
    reason: str
    # The dtype generation stores its weight matrices in, when it differs from the
    # compute dtype (fp16 on CPUs with the FBGEMM kernel); None: the compute dtype.
    decode_weights: torch.dtype | None = None

    @property
    def decode_dtype(self) -> torch.dtype | None:
        """Generation's compute dtype: the autocast dtype on accelerators (None: fp32), fp32
        on the CPU, where bf16 element-wise work is slow at batch 1 (a bf16 Decoder: 411
        against 516 tokens/s in fp32, on a CPU with native bf16). As under autocast, it
        is the dtype of the matrix products: the ``Decoder`` keeps its residual stream
        and layer norms in fp32."""
        return torch.float32 if self.device.type == "cpu" else self.autocast_dtype

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")

    def autocast(self):
        """Context manager for the forward pass (a no-op in fp32)."""
        return self._autocast(self.autocast_dtype)

    def generation_autocast(self):
        """The same for generation's full forward passes, in ``decode_dtype``."""
        return self._autocast(self.decode_dtype)

    def _autocast(self, dtype: torch.dtype | None):
        lower = dtype not in (None, torch.float32)
        return torch.autocast(device_type=self.device.type, dtype=dtype if lower else torch.float32, enabled=lower)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as PyTorch's kernels are allowed to use it.

    ``ATEN_CPU_CAPABILITY=avx2`` (or lower) keeps PyTorch's kernels to AVX2 on a CPU that
    has more, which is how an AVX2-only machine is emulated: bf16 then runs as slowly as
    there, so the answer is no whatever the CPU's flags say.
    """
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2", "zvector"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def detect_runtime(device: str | None = None, precision: str | None = None,
                   local_rank: int | None = None) -> Runtime:
    """Pick device and precision. ``device``/``precision`` force a choice ("cpu", "bf16").

    ``local_rank`` is given by a process of a distributed job (torchrun's LOCAL_RANK): on
    CUDA each such process owns one GPU, ``cuda:LOCAL_RANK``, which becomes its current
    device; the rules for the precision are the same.
    """
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        configure_cpu()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is visible; use --device cpu")
    if local_rank is not None and dev.type == "cuda":
        dev = _gpu_of_local_rank(dev, local_rank)
    elif dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"there is no {dev}: this machine has {count} CUDA GPU(s), numbered from cuda:0; "
                         "give one of those or --device cuda")

    if precision not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if dev.type == "cuda":
        return _cuda_runtime(dev, precision)
    if precision in (None, "auto"):
        if dev.type == "cpu":
            if cpu_has_native_bf16():
                return _on_cpu(torch.bfloat16, "CPU with native bf16: bf16 autocast")
            return _on_cpu(None, "CPU without native bf16: fp32")
        return Runtime(dev, None, False, f"{dev.type.upper()}: fp32 (reduced precision is slow or unsafe here)")
    if precision == "fp32":
        return Runtime(dev, None, False, "fp32 as requested")
    if precision == "bf16":
        if dev.type == "cpu" and not cpu_has_native_bf16():
            raise ValueError("this CPU has no native bf16 and would run it many times slower; use fp32")
        if dev.type == "cpu":
            return _on_cpu(torch.bfloat16, "bf16 autocast as requested")
        return Runtime(dev, torch.bfloat16, False, "bf16 autocast as requested")
    if dev.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use fp32")
    return Runtime(dev, torch.float16, False, "fp16 autocast as requested")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of ``device`` (``cuda:N``; plain ``cuda``: the current GPU)."""
    return torch.cuda.get_device_capability(device)


def _cuda_runtime(dev: torch.device, precision: str | None) -> Runtime:
    """The precision rules on a CUDA GPU, from the compute capability of ``dev`` itself."""
    major, minor = cuda_capability(dev)
    ampere_or_newer = major >= 8  # bf16 and TF32 tensor cores arrived with sm80
    tf32 = configure_cuda(dev)
    where = f"CUDA GPU of compute capability {major}.{minor}"
    if precision in (None, "auto"):
        if ampere_or_newer:
            runtime = Runtime(dev, torch.bfloat16, False, f"{where}, with bf16 tensor cores: bf16 autocast")
        else:
            runtime = Runtime(dev, torch.float16, True, f"{where}, without bf16 tensor cores: fp16 autocast "
                                                        "with loss scaling")
    elif precision == "fp32":
        runtime = Runtime(dev, None, False, "fp32 as requested")
    elif precision == "bf16":
        note = "" if ampere_or_newer else (f" ({where} has no bf16 tensor cores, so bf16 is emulated and slow; "
                                           "fp16 uses its tensor cores)")
        runtime = Runtime(dev, torch.bfloat16, False, "bf16 autocast as requested" + note)
    else:
        runtime = Runtime(dev, torch.float16, True, "fp16 autocast as requested, with loss scaling")
    if tf32:
        return replace(runtime, reason=runtime.reason + "; fp32 matrix products in TF32")
    return runtime


def configure_cuda(device: torch.device) -> bool:
    """Process-wide CUDA settings for ``device``; returns whether TF32 is on.

    From compute capability 8.0 the tensor cores multiply fp32 matrices as TF32 (inputs
    rounded to a 10-bit mantissa, fp32 range, fp32 sums): ``--precision fp32`` and
    whatever autocast keeps in fp32 then run on them instead of the much slower fp32
    units. ``set_float32_matmul_precision`` rather than the per-backend
    ``fp32_precision`` switches of PyTorch 2.9+: after those, PyTorch refuses
    ``get_float32_matmul_precision()``, which torch.compile's Inductor calls.
    """
    if cuda_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    return True


def _gpu_of_local_rank(requested: torch.device, local_rank: int) -> torch.device:
    """The GPU a process of a distributed job trains on: the one its LOCAL_RANK names."""
    if requested.index is not None and requested.index != local_rank:
        raise ValueError(f"under torchrun each process uses the GPU its LOCAL_RANK names (cuda:{local_rank} "
                         f"here), not {requested}; give --device cuda or leave --device out")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"this node has {count} GPU(s) but torchrun started a process with LOCAL_RANK "
                         f"{local_rank}; use --nproc-per-node={count} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _on_cpu(autocast_dtype: torch.dtype | None, reason: str) -> Runtime:
    """A CPU runtime whose generation reads fp16 weights where the kernel exists."""
    if cpu_half_weights_available():
        return Runtime(torch.device("cpu"), autocast_dtype, False,
                       f"{reason}; generation reads fp16 copies of the weights", decode_weights=torch.float16)
    return Runtime(torch.device("cpu"), autocast_dtype, False, reason)


@functools.cache
def cpu_half_weights_available() -> bool:
    """Whether this PyTorch multiplies fp32 rows by fp16-stored weights on the CPU
    (FBGEMM's kernel, checked once against an fp32 product)."""
    return half_products_work()


def compile_model(model: torch.nn.Module):
    """``torch.compile``'s wrapper of ``model``, or None, and a note for the user.

    Compilation happens at the first call, so a failure there (no C++ compiler, an
    unsupported platform) only shows up in the training step; the trainer then goes
    on without it. It is meant for GPUs, where it fuses the element-wise work between
    the matrix products. On a 2-core CPU the compact model trained ~15% slower
    compiled (2.7k against 3.0-3.5k tokens/s, after a 34 s first step), so it is opt-in.
    """
    if not hasattr(torch, "compile"):
        return None, "this PyTorch has no torch.compile; training without it"
    try:
        return torch.compile(model), "torch.compile on: the first step compiles the model (a minute or more)"
    except Exception as error:  # e.g. a Python version that torch.compile does not support yet
        return None, f"torch.compile is unavailable here ({error}); training without it"


def accelerator_memory_gib(runtime: Runtime) -> float | None:
    if runtime.device.type == "cuda":  # plain "cuda": the current GPU, as everything placed on it
        return torch.cuda.get_device_properties(runtime.device).total_memory / 2**30
    return None


def pick_preset(runtime: Runtime) -> tuple[str, int, int, int]:
    """The seed's hardware scaling: the largest preset the accelerator's memory fits."""
    mem = accelerator_memory_gib(runtime)
    if mem is None:  # CPU and MPS: the compact model is what trains in reasonable time
        return PRESETS[-1][1:]
    for min_mem, name, d_model, n_layer, n_head in PRESETS:
        if mem >= min_mem:
            return name, d_model, n_layer, n_head
    return PRESETS[-1][1:]


def preset_by_name(name: str) -> tuple[str, int, int, int]:
    for _, pname, d_model, n_layer, n_head in PRESETS:
        if pname == name:
            return pname, d_model, n_layer, n_head
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")


# What a training step holds on a GPU, for the automatic batch size. Per token and
# layer, the activations kept for the backward pass, in values of d_model: the block's
# input and the stream after attention (2), the two layer-norm outputs as the products
# read them (2), q|k|v (3), the attention output and its contiguous copy (2), the MLP's
# hidden layer before and after GELU (4 + 4), the dropout masks and the attention's
# log-sum-exp (about 1): 18, taken as 20. Each is 2 bytes under autocast, 4 in fp32.
ACTIVATION_VALUES_PER_LAYER = 20
# Per logit (token x vocabulary): the logits in the autocast dtype, their fp32 copy,
# the fp32 log-probabilities cross-entropy keeps, and the gradients of the logits:
# about 16 bytes (2 + 4 + 4 + 4 + 2 under bf16 autocast; 4 + 4 + 4 + 4 in fp32).
LOGIT_BYTES = 16
# Per parameter: fp32 weights and gradients, and AdamW's two fp32 moments.
PARAMETER_BYTES = 16
# The share of the card's memory a step may plan on; the rest is the CUDA context,
# the allocator's fragmentation, evaluation batches and the cuBLAS/attention workspaces.
GPU_MEMORY_SHARE = 0.7


def default_batch_size(runtime: Runtime, model: ModelConfig, window: int | None = None) -> int:
    """A micro-batch that keeps the device busy without running out of memory.

    On the CPU (and MPS) a small fixed batch, 8, is fastest per token seen. On a GPU
    the largest power of two (at most 256) whose step fits ``GPU_MEMORY_SHARE`` of the
    card: per sequence, ``window`` tokens (the model's context unless the data's
    windows are shorter) of activations (``model.n_layer`` layers of
    ``ACTIVATION_VALUES_PER_LAYER * d_model`` values) and logits (``vocab_size *
    LOGIT_BYTES``), after the weights and the optimizer's state
    (``n_params_estimate`` x ``PARAMETER_BYTES``).
    """
    memory = accelerator_memory_gib(runtime)
    if memory is None:
        return 8
    window = model.context if window is None else window
    element = 4 if runtime.autocast_dtype is None else 2
    per_token = model.n_layer * ACTIVATION_VALUES_PER_LAYER * model.d_model * element + model.vocab_size * LOGIT_BYTES
    free = memory * 2**30 * GPU_MEMORY_SHARE - model.n_params_estimate() * PARAMETER_BYTES
    batch = max(1, int(free // (per_token * window)))
    # round down to a power of two, a friendly size for the kernels
    return min(256, 1 << (batch.bit_length() - 1))


def usable_cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_cpu_threads() -> None:
    """Use the physical cores we are allowed; oversubscription slows matmuls a lot."""
    allowed = usable_cpu_cores()
    if torch.get_num_threads() > allowed:
        torch.set_num_threads(allowed)


def configure_cpu_threads_for_serving() -> int:
    """Leave one core to a server's event loop; returns the threads generation now uses.

    A server has one more busy thread than the menu: its event loop, which reads
    requests and writes every piece of every answer. With as many OpenMP threads as
    cores, that thread takes a core from one of them, and the others spin at the next
    barrier until it comes back. On our 2-core machine under other load, 16 clients
    got 20-40 tokens/s with 2 threads and 500-650 with 1.
    """
    threads = max(1, usable_cpu_cores() - 1)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def release_cpu_threads_of_this_thread() -> bool:
    """Let go of the OpenMP helper threads this thread's parallel work started.

    For a thread that hands its tensor work to another one (the server's event loop,
    whose generation runs on the worker's thread). OpenMP keeps a team of helpers for
    every thread that has run a parallel operation, and GNU OpenMP (PyTorch's on Linux)
    lets waiting helpers spin only while it manages no more threads than there are
    cores; past that, every parallel operation wakes its helpers from sleep. So once
    the menu had generated on two threads, a server started from it ran each two-thread
    operation of its worker far slower on the 2-core Xeon (adding two tensors of 64K
    values: 5 us -> 66-85), and 16 streams on the bench's gpt2 made 2,321-2,370 tokens/s
    in all against 2,952-3,076 with the helpers let go (three alternating runs; the
    llama model, whose big steps gain little from a second thread, was unchanged). The
    team comes back by itself if this thread runs parallel work again. Returns whether
    GNU OpenMP took the request: False where it is not loaded (macOS's and Windows'
    runtimes are left alone) or too old to have the call (before GCC 9).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            libraries = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return False
    import ctypes

    released = False
    for path in sorted(libraries):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all  # OpenMP 5.0; GNU OpenMP from GCC 9
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        released = pause(2) == 0 or released  # omp_pause_hard: the team's threads end
    return released


def configure_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel.

    glibc serves every allocation above a threshold (the logits of one CPU training
    step are 64 MB) with a fresh ``mmap`` and unmaps it on free, so each step pays a
    page fault per 4 KiB of every large tensor: about 65,000 faults and 10-25% of the
    step on the compact preset. Turning that off makes the second step reuse the first
    step's memory. The cost: the resident size stays at its peak instead of shrinking
    between steps. A no-op (returns False) off glibc.
    """
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1
        return libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False


@functools.cache
def configure_cpu() -> None:
    """Process-wide CPU settings, once: threads and the memory allocator.

    ``detect_runtime`` calls it for every CPU runtime, so whatever trains or generates
    on the CPU (the menu, the command line, the server, a script that only builds a
    Runtime) runs with them; without the allocator setting a compact training step
    took ~1.2x as long (the 64 MB logits were page-faulted in afresh every step).
    """
    configure_cpu_threads()
    configure_cpu_allocator()


def total_ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def system_summary(runtime: Runtime) -> list[tuple[str, str]]:
    """Rows for the System Information screen."""
    rows = [("Device", str(runtime.device)), ("Precision", f"{runtime.precision} ({runtime.reason})")]
    if runtime.device.type == "cuda":
        props = torch.cuda.get_device_properties(runtime.device)
        rows.append(("GPU", props.name))
        rows.append(("GPU memory", f"{props.total_memory / 2**30:.1f} GiB"))
    rows.append(("CPU", platform.processor() or platform.machine()))
    rows.append(("CPU cores", f"{os.cpu_count()} (torch uses {torch.get_num_threads()} threads)"))
    ram = total_ram_gib()
    if ram is not None:
        rows.append(("RAM", f"{ram:.1f} GiB"))
    rows.append(("Python", platform.python_version()))
    rows.append(("PyTorch", torch.__version__))
    return rows
