"""bench.py's own arithmetic and a tiny end-to-end pass of its timed sections."""
import bench
from model import GPT, ModelConfig

TINY = ModelConfig(vocab_size=300, context=16, d_model=32, n_layer=1, n_head=2)


def test_flops_per_token_counts_the_head_but_not_positions():
    model = GPT(TINY)
    weights = model.num_params() - model.wpe.weight.numel()
    assert bench.flops_per_token(model) == 6 * weights + 12 * 1 * 32 * 16


def test_training_and_generation_sections_run_on_a_tiny_model():
    train = bench.bench_training(TINY, batch=2, precision="fp32", steps=2, warmup=1)
    assert train["tokens_per_s"]["median"] > 0 and train["steps"] == 2
    assert 0 <= train["batch_prep_pct_of_step"] < 100
    gen = bench.bench_generation(TINY, bench.NoEndTokenizer(None), new_tokens=5, prompt_len=3, repeats=1)
    assert gen["cached"]["tokens"] == gen["uncached"]["tokens"] == 5  # no end token: every run is full length
    # Where generation reads fp16 weights, the exact fp32 row is timed beside it.
    assert ("cached_fp32" in gen) == (gen["weights"] == "fp16")
    # What the cache buys compares like with like: the fp32 cached row against the uncached one.
    same = gen.get("cached_fp32", gen["cached"])
    assert gen["cache_speedup"] == same["tokens_per_s"]["median"] / gen["uncached"]["tokens_per_s"]["median"]


def test_other_load_is_a_share_or_unknown():
    with bench.OtherLoad() as load:
        sum(range(10_000))
    assert load.share is None or 0.0 <= load.share <= 1.0


def test_half_weight_quality_check_scores_every_held_out_token():
    import pytest
    import torch

    from engine.runtime import hardware
    if not hardware.cpu_half_weights_available():
        pytest.skip("no fp16-weight kernel on this CPU")
    torch.manual_seed(0)
    ids = list(range(1, 40))  # 38 predictions over three windows of the 16-token context
    result = bench.bench_half_weights(GPT(TINY), ids)
    assert result["tokens"] == len(ids) - 1
    # A random 300-token model predicts ~log2(300) = 8.2 bits per token either way.
    assert 7.5 < result["fp32_bits_per_token"] < 9
    assert abs(result["fp16_bits_per_token"] - result["fp32_bits_per_token"]) < 1e-3
    assert result["top1_agreement"] > 0.9


def test_the_server_load_run_answers_every_request(trained_once, tmp_path):
    result = bench.bench_server(trained_once("bpe", 1), clients=4, per_client=2, max_tokens=8, workdir=tmp_path)
    assert result["succeeded"] == result["requests"] == 8 and not result["errors"]
    assert 0 < result["completion_tokens"] <= 8 * 8 and result["tokens_per_s"] > 0
    assert result["latency_s"]["p50"] <= result["latency_s"]["p95"] <= result["latency_s"]["max"]
    assert result["first_token_s"], "half the requests stream"
    assert result["direct_tokens_per_s"] > 0  # the in-process yardstick made the same requests
    for row in result["levels"]:  # never more open at once than there are clients, and some always
        assert 0 < row["in_flight"] <= row["streams"] + 1e-6, row
        # The same requests through the worker without HTTP got the same tokens: a request's
        # draws do not depend on the others in its batch, nor on the way it came in.
        assert row["worker_completion_tokens"] == row["completion_tokens"], row
        assert row["worker_tokens_per_s"] > 0
    assert result["levels"][0]["worker_vs_one"] == 1.0


def test_the_training_breakdown_accounts_for_the_step_and_names_the_kernels():
    train = bench.bench_training(TINY, batch=2, precision="fp32", steps=1, warmup=1, profile_steps=2)
    b = train["breakdown"]
    assert b["steps"] == 2 and b["step_ms"] > 0
    assert abs(sum(row["pct"] for row in b["categories"]) - 100) < 1e-6
    assert [row["ms"] for row in b["categories"]] == sorted((row["ms"] for row in b["categories"]), reverse=True)
    assert {row["category"] for row in b["categories"]} >= set(bench.STEP_CATEGORIES)
    ms = {row["category"]: row["ms"] for row in b["categories"]}
    assert ms["matrix products"] > 0 and ms["optimizer (AdamW, clipping)"] > 0
    # CPU fp32 training with dropout: fused AdamW, the fused loss head, the explicit attention.
    assert b["kernels"]["fused_adamw"] and b["kernels"]["fused_loss"]
    assert b["kernels"]["attention"].startswith("explicit")


def test_step_categories_follow_the_op_and_where_it_ran():
    assert bench.step_category("aten::mm", ["FusedHeadLoss"]) == "matrix products"
    assert bench.step_category("aten::exp_", ["FusedHeadLoss"]) == "cross-entropy / loss head"
    assert bench.step_category("aten::_log_softmax_backward_data", []) == "cross-entropy / loss head"
    assert bench.step_category("aten::_softmax", []) == "attention softmax"
    assert bench.step_category("aten::mul_", ["aten::_foreach_mul_"]) == "optimizer (AdamW, clipping)"
    assert bench.step_category("aten::_fused_adamw_", ["Optimizer.step#AdamW.step"]) == "optimizer (AdamW, clipping)"
    assert bench.step_category("aten::gelu_backward", ["GeluBackward0"]) == "element-wise passes"
    assert bench.step_category("aten::embedding_dense_backward", []) == "other aten ops"


def test_the_cpu_instruction_sets_are_reported():
    isa = bench.cpu_instruction_sets()
    assert isa["torch_capability"]
    assert isa["flags"] is None or set(isa["flags"]) == set(bench.CPU_FLAGS)
    assert set(isa["caps_set"]) <= set(bench.ISA_CAPS)


def test_a_tokens_cost_is_split_into_its_parts_and_the_step_by_kind_of_op(trained_once):
    import pytest

    from response_generator import GenerationConfig, ResponseGenerator

    gen = ResponseGenerator(str(trained_once("bpe", 1)))
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.0, seed=0)
    cost = bench.token_cost(gen, "The river", cfg, replies=1)
    assert cost["tokens"] > 1 and min(cost["step_us"], cost["sampling_us"] + cost["streaming_us"]) > 0
    assert cost["token_us"] == pytest.approx(cost["step_us"] + cost["sampling_us"] + cost["streaming_us"]
                                             + cost["loop_us"])
    kinds = cost["step_by_kind"]
    assert kinds["matrix products"] > 0 and kinds["attention"] > 0
    assert sum(us for kind, us in kinds.items() if kind != "profiled step") == pytest.approx(kinds["profiled step"])


def test_op_kinds_follow_the_aten_name():
    assert bench.op_kind("aten::fbgemm_linear_fp16_weight_fp32_activation") == "matrix products"
    assert bench.op_kind("aten::addmm") == "matrix products"
    assert bench.op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench.op_kind("aten::native_layer_norm") == bench.op_kind("aten::hypot") == "norms"
    assert bench.op_kind("aten::gelu") == bench.op_kind("aten::add_") == "element-wise passes"
    assert bench.op_kind("aten::slice").startswith("tensor bookkeeping")


def test_the_llama_cpp_race_alternates_rounds_on_each_export(trained_once):
    import pytest

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (scripts/install_llama_cpp.sh)")
    pytest.importorskip("gguf", reason="the gguf package is an optional extra (requirements-export.txt)")
    race = bench.race_llama_cpp(trained_once("bpe", 1), dtypes=("f16", "f32"), threads=1, rounds=2, new_tokens=6)
    assert race["threads"] == 1 and len(race["ours"]["all"]) == 2 and race["ours"]["median"] > 0
    for dtype in ("f16", "f32"):
        row = race["files"][dtype]
        assert row["skipped"] is None, row["skipped"]
        assert len(row["theirs"]["all"]) == len(row["ratio"]["all"]) == 2
        assert 0 < row["tokens"] <= 6
    assert race["files"]["f32"]["bytes"] > race["files"]["f16"]["bytes"]


def test_both_engines_decode_several_sequences_at_once(trained_once, capsys):
    import pytest

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (scripts/install_llama_cpp.sh)")
    pytest.importorskip("gguf", reason="the gguf package is an optional extra (requirements-export.txt)")
    from benchlib.batched_race import race_batched
    from benchlib.report import print_batched_race

    race = race_batched(trained_once("bpe", 1), threads=1, levels=(1, 3), steps=4, rounds=1)
    assert race["every_sequence_same"]  # three copies of one greedy sequence, batch-invariant: equal tokens
    assert [row["sequences"] for row in race["levels"]] == [1, 3] and race["steps"] == 4
    for row in race["levels"]:
        assert row["ours"] > 0 and row["theirs"] > 0 and len(row["ours_all"]) == len(row["theirs_all"]) == 1
    assert race["levels"][0]["ours_vs_one"] == race["levels"][0]["theirs_vs_one"] == 1.0
    print_batched_race(race)
    assert "llama.cpp tok/s" in capsys.readouterr().out


def test_the_character_baseline_scores_held_out_text_in_bits_per_byte(tmp_path):
    """scripts/char_baseline.py, the yardstick of the time budget: a model with all weights 0
    predicts every character with 1/V, so an ASCII text scores exactly log2(V) bits per byte;
    a short run reports its steps and a held-out score near that (how far below depends on
    how many steps this machine makes in the time)."""
    import importlib.util
    import json
    import math
    import subprocess
    import sys

    import torch

    from conftest import ROOT, SAMPLE_TEXT
    spec = importlib.util.spec_from_file_location("char_baseline", ROOT / "scripts" / "char_baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    text = "abcab" * 60
    model = GPT(ModelConfig(vocab_size=3, context=baseline.CONTEXT, d_model=32, n_layer=1, n_head=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ids = torch.tensor(["abc".index(c) for c in text])
    assert math.isclose(baseline.held_out_bits_per_byte(model, ids, text), math.log2(3), rel_tol=1e-5)
    assert baseline.learning_rate(0, 0.0) == baseline.PEAK_LR / baseline.WARMUP
    assert math.isclose(baseline.learning_rate(10_000, 1.0), baseline.MIN_LR)
    data = tmp_path / "text.txt"
    data.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "char_baseline.py"), "--seconds", "2", "--data",
                          str(data), "--json", str(tmp_path / "row.json")], capture_output=True, text=True,
                         check=True, timeout=300)
    row = json.loads((tmp_path / "row.json").read_text())
    assert json.loads(out.stdout) == row and row["steps"] > 0
    assert 0 < row["bpb"] < 1.5 * math.log2(row["chars"])  # bits (not nats) per byte: near a uniform guess at worst
