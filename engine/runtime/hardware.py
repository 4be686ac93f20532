"""The one place that decides where and in which precision the model runs.

Everything else asks the model for its device; nothing else probes the hardware.
The rules, and why:

* CUDA first, then Apple's MPS, then the CPU.
* On CUDA, bf16 autocast where the GPU supports it (Ampere and newer): same range as
  fp32, so no loss scaling is needed. Older GPUs get fp16 autocast with a GradScaler,
  because fp16's narrow range underflows small gradients.
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
from dataclasses import dataclass

import torch

from engine.model.decoder import half_products_work

# (minimum accelerator memory in GiB, name, d_model, n_layer, n_head), largest first.
PRESETS = [
    (24.0, "large", 1024, 12, 16),
    (12.0, "medium", 768, 8, 12),
    (8.0, "standard", 512, 6, 8),
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
        against 516 tokens/s in fp32, on a CPU with native bf16)."""
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

    if precision not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision in (None, "auto"):
        if dev.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Runtime(dev, torch.bfloat16, False, "CUDA GPU with bf16 support: bf16 autocast")
            return Runtime(dev, torch.float16, True, "CUDA GPU without bf16: fp16 autocast with loss scaling")
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
    return Runtime(dev, torch.float16, dev.type == "cuda", "fp16 autocast as requested")


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
    if runtime.device.type == "cuda":
        index = runtime.device.index or 0
        return torch.cuda.get_device_properties(index).total_memory / 2**30
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


def default_batch_size(runtime: Runtime, d_model: int, context: int) -> int:
    """A micro-batch that keeps the device busy without running out of memory.

    On the CPU a small fixed batch is fastest per token seen. On a GPU the activation
    memory grows roughly with batch * window * d_model * layers; this rule of thumb
    leaves head-room for the optimizer and the allocator.
    """
    mem = accelerator_memory_gib(runtime)
    if mem is None:
        return 8
    budget_tokens = mem * 2**30 * 0.35 / (d_model * 4 * 40)  # ~40 activations of d_model per token per layer-ish
    batch = max(1, int(budget_tokens // context))
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
        props = torch.cuda.get_device_properties(runtime.device.index or 0)
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
