"""The CUDA paths, checked on a machine without a GPU.

``torch.cuda``'s queries are faked (capabilities and memory of named cards), so the
rules that decide precision, TF32, presets and batch sizes run as they would on the
card; the generation ``Decoder``'s low-precision arithmetic runs on the CPU, whose
kernels take fp16 and bf16 too.
"""
from types import SimpleNamespace

import pytest
import torch

from engine.model.decoder import Decoder
from engine.model.products import Product
from engine.runtime import hardware
from model import GPT, ModelConfig


class FakeCuda:
    """Some CUDA GPUs as PyTorch would describe them; records which GPU each query asked."""

    def __init__(self, monkeypatch, capabilities: list[tuple[int, int]], memory_gib: list[float] | None = None):
        self.capabilities = capabilities
        self.memory_gib = memory_gib or [80.0] * len(capabilities)
        self.current = 0
        self.asked: list[int] = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.capabilities))
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "get_device_capability", self.get_device_capability)
        monkeypatch.setattr(cuda, "get_device_properties", self.get_device_properties)
        # What PyTorch 2.6+ answers by default on sm70/sm75 too (emulated bf16 counts).
        monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def index(self, device) -> int:
        if device is None:
            return self.current
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.current if device.index is None else device.index

    def set_device(self, device) -> None:
        self.current = self.index(device)

    def get_device_capability(self, device=None) -> tuple[int, int]:
        self.asked.append(self.index(device))
        return self.capabilities[self.asked[-1]]

    def get_device_properties(self, device=None):
        return SimpleNamespace(name="Fake GPU", total_memory=int(self.memory_gib[self.index(device)] * 2**30))


@pytest.fixture
def matmul_precision():
    """Put the process-wide fp32 matmul precision back as it was (a CUDA runtime sets TF32)."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


# -- precision --------------------------------------------------------------------------

@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])  # V100, T4
def test_gpus_without_bf16_tensor_cores_get_fp16_with_a_grad_scaler(monkeypatch, matmul_precision, capability):
    FakeCuda(monkeypatch, [capability])
    runtime = hardware.detect_runtime()
    assert runtime.device.type == "cuda"
    assert runtime.autocast_dtype == torch.float16 and runtime.use_grad_scaler
    assert "without bf16 tensor cores" in runtime.reason and f"{capability[0]}.{capability[1]}" in runtime.reason


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])  # A100, RTX 30xx, H100
def test_ampere_and_newer_get_bf16_without_a_scaler(monkeypatch, matmul_precision, capability):
    FakeCuda(monkeypatch, [capability])
    runtime = hardware.detect_runtime("cuda")
    assert runtime.autocast_dtype == torch.bfloat16 and not runtime.use_grad_scaler


def test_the_capability_is_that_of_the_gpu_asked_for(monkeypatch, matmul_precision):
    cuda = FakeCuda(monkeypatch, [(9, 0), (7, 5)])  # an H100 beside a T4; the H100 is current
    runtime = hardware.detect_runtime("cuda:1")
    assert runtime.device == torch.device("cuda", 1)
    assert set(cuda.asked) == {1}
    assert runtime.autocast_dtype == torch.float16 and runtime.use_grad_scaler
    cuda.asked.clear()
    assert hardware.detect_runtime("cuda:0").autocast_dtype == torch.bfloat16
    assert set(cuda.asked) == {0}


def test_a_torchrun_process_asks_its_own_gpu(monkeypatch, matmul_precision):
    cuda = FakeCuda(monkeypatch, [(9, 0), (7, 5)])
    runtime = hardware.detect_runtime("cuda", local_rank=1)
    assert cuda.current == 1 and set(cuda.asked) == {1}
    assert runtime.device == torch.device("cuda", 1) and runtime.use_grad_scaler


def test_a_gpu_that_is_not_there_is_a_clear_error(monkeypatch, matmul_precision):
    FakeCuda(monkeypatch, [(9, 0), (9, 0)])
    with pytest.raises(ValueError, match="there is no cuda:2: this machine has 2 CUDA GPU"):
        hardware.detect_runtime("cuda:2")


@pytest.mark.parametrize("precision, dtype, scaler", [("fp16", torch.float16, True), ("bf16", torch.bfloat16, False),
                                                      ("fp32", None, False)])
def test_requested_precisions_on_cuda(monkeypatch, matmul_precision, precision, dtype, scaler):
    FakeCuda(monkeypatch, [(7, 5)])
    runtime = hardware.detect_runtime("cuda", precision)
    assert runtime.autocast_dtype == dtype and runtime.use_grad_scaler == scaler
    assert ("emulated" in runtime.reason) == (precision == "bf16")  # a T4 has no bf16 tensor cores


# -- TF32 ------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_tf32_is_on_from_ampere_and_the_device_line_says_so(monkeypatch, matmul_precision, precision):
    torch.set_float32_matmul_precision("highest")
    FakeCuda(monkeypatch, [(8, 0)])
    runtime = hardware.detect_runtime("cuda", precision)
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert "TF32" in runtime.reason
    assert dict(hardware.system_summary(runtime))["Precision"].endswith("fp32 matrix products in TF32)")


def test_no_tf32_before_ampere_nor_on_the_cpu(monkeypatch, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert "TF32" not in hardware.detect_runtime("cpu").reason
    assert "TF32" not in hardware.detect_runtime("cpu", "fp32").reason
    FakeCuda(monkeypatch, [(7, 5)])
    assert "TF32" not in hardware.detect_runtime("cuda", "fp32").reason
    assert torch.get_float32_matmul_precision() == "highest"


# -- presets and batch sizes -------------------------------------------------------------

def cuda_runtime(dtype=torch.bfloat16) -> hardware.Runtime:
    return hardware.Runtime(torch.device("cuda"), dtype, False, "faked")


@pytest.mark.parametrize("memory_gib, preset", [
    (79.1, "large"),  # H100 80GB
    (23.6, "large"),  # RTX 4090 / 3090, sold as 24 GB
    (15.8, "medium"),  # V100 16GB
    (14.6, "medium"),  # T4, 16 GB
    (11.7, "medium"),  # RTX 3060 12GB
    (7.8, "standard"),  # RTX 3070 / 4060, 8 GB
    (5.8, "compact"),  # 6 GB cards
])
def test_cards_get_the_preset_of_the_memory_they_are_sold_with(monkeypatch, memory_gib, preset):
    FakeCuda(monkeypatch, [(8, 6)], [memory_gib])
    assert hardware.pick_preset(cuda_runtime())[0] == preset


def large_preset(n_layer: int = 12, vocab_size: int = 8000, context: int = 1024) -> ModelConfig:
    """The large preset's width (d1024, 16 heads) at ``n_layer`` layers."""
    return ModelConfig(vocab_size=vocab_size, context=context, d_model=1024, n_layer=n_layer, n_head=16)


def test_the_automatic_batch_shrinks_as_the_model_deepens(monkeypatch):
    FakeCuda(monkeypatch, [(9, 0)], [79.1])
    runtime = cuda_runtime()
    batches = [hardware.default_batch_size(runtime, large_preset(n)) for n in (2, 6, 12, 24, 48)]
    assert batches == sorted(batches, reverse=True) and batches[-1] < batches[0]
    # The large preset at context 1024 on an 80 GB card: 128 sequences nearly filled it.
    assert hardware.default_batch_size(runtime, large_preset()) == 64
    # A larger vocabulary means more logits per token; fp32 activations twice the bytes.
    assert hardware.default_batch_size(runtime, large_preset(vocab_size=64_000)) < batches[2]
    assert hardware.default_batch_size(cuda_runtime(None), large_preset()) < batches[2]


def test_the_automatic_batch_fits_what_it_plans_for_on_every_preset(monkeypatch):
    for memory_gib in (7.8, 11.7, 23.6, 79.1):
        FakeCuda(monkeypatch, [(9, 0)], [memory_gib])
        name, d_model, n_layer, n_head = hardware.pick_preset(cuda_runtime())
        for context in (256, 1024):
            model = ModelConfig(vocab_size=8000, context=context, d_model=d_model, n_layer=n_layer, n_head=n_head)
            batch = hardware.default_batch_size(cuda_runtime(), model)
            per_token = (n_layer * hardware.ACTIVATION_VALUES_PER_LAYER * d_model * 2
                         + 8000 * hardware.LOGIT_BYTES)
            assert batch * context * per_token <= hardware.GPU_MEMORY_SHARE * memory_gib * 2**30, (name, context)
            assert batch >= 4, (name, context)  # and still a useful batch


def test_the_cpu_batch_is_unchanged():
    cpu = hardware.detect_runtime("cpu", "fp32")
    assert hardware.default_batch_size(cpu, ModelConfig(vocab_size=8000)) == 8  # the compact model
    assert hardware.default_batch_size(cpu, large_preset()) == 8


def test_the_automatic_batch_is_sized_for_the_windows_that_train(monkeypatch):
    """Data whose windows are shorter than the model's context holds fewer activations per sequence."""
    FakeCuda(monkeypatch, [(9, 0)], [23.6])
    runtime = cuda_runtime()
    assert hardware.default_batch_size(runtime, large_preset(), window=1024) == hardware.default_batch_size(
        runtime, large_preset())
    assert hardware.default_batch_size(runtime, large_preset(), window=256) == hardware.default_batch_size(
        runtime, large_preset(context=256)) > hardware.default_batch_size(runtime, large_preset())


# -- the generation Decoder in fp16 and bf16 ----------------------------------------------

@pytest.fixture
def small_model() -> GPT:
    torch.manual_seed(7)
    return GPT(ModelConfig(vocab_size=211, context=32, d_model=64, n_layer=3, n_head=4, dropout=0.0)).eval()


def decode(decoder: Decoder, ids: list[int]) -> torch.Tensor:
    """The logits after every position from the 6th on: a prefill, then one token at a time."""
    cache = decoder.new_cache()
    return torch.stack([decoder.step(ids[:6], cache)] + [decoder.step([t], cache) for t in ids[6:]])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_low_precision_decoding_stays_close_to_fp32(small_model, dtype, tolerance):
    ids = torch.randint(0, 211, (20,)).tolist()
    exact = small_model(torch.tensor([ids]))[0][0, 5:]
    decoder = Decoder(small_model, dtype)
    got = decode(decoder, ids)
    assert got.dtype == torch.float32
    # fp16 products round to 11 bits, bf16 ones to 8; logits here are of size ~0.5.
    torch.testing.assert_close(got, exact, atol=tolerance, rtol=0)
    assert not torch.equal(got, exact)  # the low precision is really used


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_decoder_keeps_products_low_and_the_stream_in_fp32(small_model, dtype):
    decoder = Decoder(small_model, dtype)
    assert decoder.dtype == dtype and decoder.stream_dtype == torch.float32
    assert decoder.wte.dtype == decoder.wpe.dtype == torch.float32
    assert decoder.wte.data_ptr() == small_model.wte.weight.data_ptr()  # the model's own: no copy
    assert all(t.dtype == torch.float32 for t in decoder.ln_f)
    for w1, b1, qkv, proj, w2, b2, fc, fc_proj in decoder.layers:
        assert {w1.dtype, b1.dtype, w2.dtype, b2.dtype} == {torch.float32}
        assert all(isinstance(p, Product) and p.weight.dtype == dtype for p in (qkv, proj, fc, fc_proj))
    assert decoder.head.weight.dtype == dtype and decoder.new_cache().rows.dtype == dtype


def test_an_fp16_residual_stream_past_65504_does_not_overflow(small_model):
    # A stream that fp16 cannot hold: position rows of +-65000 (the largest fp16 is 65504),
    # and an attention bias that pushes them past it. Training's autocast keeps the stream
    # in fp32 and the layer norm brings it back to size; decoding must do the same.
    with torch.no_grad():
        sign = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
        small_model.wpe.weight.copy_(65000.0 * sign)
        small_model.h[0].attn.c_proj.bias.fill_(1000.0)
    ids = torch.randint(0, 211, (12,)).tolist()
    exact = small_model(torch.tensor([ids]))[0][0, 5:]
    assert torch.isfinite(exact).all()
    got = decode(Decoder(small_model, torch.float16), ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, exact, atol=2e-2, rtol=0)


def test_fp32_decoding_is_unchanged(small_model):
    ids = torch.randint(0, 211, (16,)).tolist()
    decoder = Decoder(small_model)
    assert decoder.stream_dtype == decoder.dtype == torch.float32
    torch.testing.assert_close(decode(decoder, ids), small_model(torch.tensor([ids]))[0][0, 5:],
                               atol=1e-5, rtol=1e-5)


# -- scripts/gpu_check.py ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_check():
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    return gpu_check


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),  # not an A10
    ("Tesla T4", None),
])
def test_mfu_uses_the_peak_of_the_exact_card(gpu_check, name, peak):
    assert gpu_check.peak_tflops(name) == peak


def test_gpu_check_selects_its_checks(gpu_check):
    smoke = gpu_check.parse_args(["--out", "x", "--smoke"]).selected
    assert "compile" not in smoke and "compile_ddp" not in smoke and "fp16_resume" in smoke
    assert gpu_check.parse_args(["--out", "x", "--smoke", "--only", "compile_ddp"]).selected == ["compile_ddp"]
    full = gpu_check.parse_args(["--out", "x", "--skip", "budget,ddp"]).selected
    assert full == [c for c in gpu_check.CHECKS if c not in ("budget", "ddp")]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--only", "nonsense"])
