"""The benchmark's printout: one table per section, from the report ``sections.run_benchmark`` collects.

Each ``print_*`` takes its section's part of the report (the dicts the ``bench_*``
functions return, which are also what ``--json`` writes) and prints it; a number
taken while other processes used the CPU carries a warning (``load_note``).
"""
from __future__ import annotations

from benchlib.machine import BUSY_WARNING, ISA_CAPS


def load_note(share: float | None) -> str:
    if share is None or share < BUSY_WARNING:
        return ""
    return f"   !! other processes used {100 * share:.0f}% of the CPU meanwhile: unreliable"


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def _note(title: str, note: str) -> None:
    """A section that did not run: its title and why."""
    print(f"\n== {title}\n  {note}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _tps(d: dict) -> str:
    return f"{d['median']:,.0f} tok/s (min {d['min']:,.0f}, max {d['max']:,.0f})"


def print_environment(env: dict) -> None:
    _table("Environment", [
        ("CPU", f"{env['cpu']} ({env['cores']} cores, torch threads {env['threads']}, "
                f"native bf16: {'yes' if env['native_bf16'] else 'no'})"),
        ("software", f"Python {env['python']}, torch {env['torch']}"),
        ("model", f"{env['config'].get('arch', 'gpt2')}, d_model {env['config']['d_model']}, "
                  f"{env['config']['n_layer']} layers, "
                  f"{env['config']['n_head']} heads, context {env['config']['context']}, "
                  f"vocab {env['config']['vocab']}, batch {env['config']['batch']}, dropout {env['config']['dropout']}"),
    ])


def print_matmul(mm: dict) -> None:
    rows = [("fp32 1024^3 matmul", f"{mm['square_fp32']['gflops_median']:.0f} GFLOP/s "
                                   f"(best {mm['square_fp32']['gflops_best']:.0f})"),
            ("fp32 model-shaped GEMMs", f"{mm['model_gemms_fp32']['gflops_median']:.0f} GFLOP/s "
                                        f"(best {mm['model_gemms_fp32']['gflops_best']:.0f})")]
    if "square_bf16" in mm:
        rows.append(("bf16 1024^3 matmul", f"{mm['square_bf16']['gflops_median']:.0f} GFLOP/s"))
    _table("Matrix products (MFU denominators)", rows)


def print_cpu_isa(isa: dict) -> None:
    caps = ", ".join(f"{name}={value}" for name, value in isa["caps_set"].items()) or "none set"
    flags = ("not readable (no /proc/cpuinfo)" if isa["flags"] is None else
             ", ".join(f"{flag} {_yes(present)}" for flag, present in isa["flags"].items()))
    _table("Training: the CPU's instruction set", [
        ("PyTorch CPU kernels", f"{isa['torch_capability']} (torch.backends.cpu.get_cpu_capability())"),
        ("caps in the environment", f"{caps} ({', '.join(ISA_CAPS)})"),
        ("CPU flags", flags),
        ("native bf16", _yes(isa["native_bf16"])),
        ("fp16-weight decode (FBGEMM)", _yes(isa["fp16_weight_decode"]) + " (generation, not training)")])


def print_training(t: dict) -> None:
    """One precision's training row: speed, MFU, memory, the kernels that ran, the profile."""
    rows = [("tokens/s", _tps(t["tokens_per_s"]) + load_note(t["other_load"])),
            ("step", f"{1e3 * t['step_s']['median']:.0f} ms (batch prep {t['batch_prep_ms']:.2f} ms = "
                     f"{t['batch_prep_pct_of_step']:.2f}% of a step)"),
            ("FLOPs/token", f"{t['flops_per_token'] / 1e6:.1f} M -> {t['achieved_gflops']:.0f} GFLOP/s achieved"),
            ("MFU", f"{t['mfu_square']:.0%} of the {t['precision']} 1024^3 rate" +
             (f", {t['mfu_model']:.0%} of the model-shaped rate" if "mfu_model" in t else "") +
             (f"; {t['mfu_model_paired']:.0%} of it timed beside each step" if "mfu_model_paired" in t else "")),
            ("peak RSS", f"{t['peak_rss_mb']:,.0f} MB"),
            ("loss", f"{t['loss_first']:.3f} -> {t['loss_last']:.3f} over {t['warmup'] + t['steps']} steps")]
    _table(f"Training ({t['precision']}, {t['params'] / 1e6:.2f}M parameters)", rows)
    b = t["breakdown"]
    k = b["kernels"]
    _table(f"Training ({t['precision']}): kernels that ran", [
        ("fused AdamW", _yes(k["fused_adamw"])),
        ("fused loss head (no logits held)", _yes(k["fused_loss"])),
        ("attention", k["attention"])])
    _table(f"Training ({t['precision']}): where a step's time goes (torch.profiler, {b['steps']} steps, "
           f"self CPU time of aten ops; {b['step_ms']:.0f} ms per profiled step)",
           [(row["category"], f"{row['ms']:7.1f} ms  {row['pct']:5.1f}%") for row in b["categories"]])


def print_generation(g: dict) -> None:
    rows = [("cached, top-k 50 T 0.8", _tps(g["cached"]["tokens_per_s"]) + f"  ({g['weights']} weights)" +
             load_note(g["other_load"]))]
    if "cached_fp32" in g:
        rows.append(("cached, fp32 weights (exact)", _tps(g["cached_fp32"]["tokens_per_s"])))
    rows += [("time to first token", f"{g['cached']['first_token_ms']:.1f} ms ({g['prompt_tokens']}-token prompt)"),
             ("cached, default sampling", _tps(g["cached_default_sampling"]["tokens_per_s"]) +
              "  (+ top-p 0.95, repetition penalty 1.1)"),
             ("uncached (reference path, fp32)", _tps(g["uncached"]["tokens_per_s"])),
             ("what the cache buys", f"{g['cache_speedup']:.1f}x (both fp32)")]
    if "stream_us_per_token" in g:
        rows.append(("text streaming", f"{g['stream_us_per_token']:.0f} us/token plain, "
                                       f"{g['stream_chat_us_per_token']:.0f} us/token with chat stops"))
    _table(f"Generation (batch 1, {g['new_tokens']} new tokens)", rows)


def print_data(rows: list[dict]) -> None:
    print("\n== Data path (MB/s: tokenize_source end to end, our encode_batch, the library alone)")
    print(f"  {'tokenizer':<14} {'corpus':<24} {'train s':>8} {'end-to-end':>11} {'wrapper':>8} {'library':>8} "
          f"{'wrapper +':>10} {'e2e +':>7} {'cache hit':>10} {'bytes/tok':>10}")
    for d in rows:
        print(f"  {d['tokenizer']:<14} {d['corpus']:<24} {d['train_s']:>8.2f} {d['encode_mb_s']:>11.2f} "
              f"{d['wrapper_mb_s']:>8.2f} {d['library_mb_s']:>8.2f} {d['wrapper_overhead_pct']:>9.1f}% "
              f"{d['end_to_end_overhead_pct']:>6.1f}% {d['cached_load_ms']:>8.1f}ms "
              f"{d['bytes_per_token']:>10.2f}{load_note(d['other_load'])}")


def print_race(race_result: dict, ref: dict) -> None:
    """The rounds of ours-then-theirs, and the spread of each ratio."""
    print(f"\n== Race: ours, then {ref['impl']} (transformers {ref['transformers']}, "
          f"{ref['params'] / 1e6:.2f}M parameters), back to back, {len(race_result['rounds'])} round(s)")
    print(f"  {'round':<6} {'train ours':>11} {'theirs':>8} {'ratio':>7}   {'generate ours':>14} {'theirs':>8} "
          f"{'ratio':>7}   {'ours, default sampling':>22} {'ratio':>7}  (tokens/s)")
    for i, row in enumerate(race_result["rounds"], 1):
        print(f"  {i:<6} {row['ours_train']:>11,.0f} {row['theirs_train']:>8,.0f} {row['train_ratio']:>6.2f}x   "
              f"{row['ours_gen']:>14,.0f} {row['theirs_gen']:>8,.0f} {row['gen_ratio']:>6.2f}x   "
              f"{row['ours_gen_default']:>22,.0f} {row['gen_ratio_default']:>6.2f}x")
    tr, gr = race_result["train_ratio"], race_result["gen_ratio"]
    print(f"  ours/theirs, training:   median {tr['median']:.2f}x (min {tr['min']:.2f}x, max {tr['max']:.2f}x)")
    print(f"  ours/theirs, generation: median {gr['median']:.2f}x (min {gr['min']:.2f}x, max {gr['max']:.2f}x)"
          f"  ({race_result['gen_weights']} weights; top-k 50, temperature 0.8 on both sides)")
    gd = race_result["gen_ratio_default"]
    print(f"  ours/theirs, generation with our default sampling (+ top-p 0.95, repetition penalty 1.1): "
          f"median {gd['median']:.2f}x (min {gd['min']:.2f}x, max {gd['max']:.2f}x)")
    if race_result["gen_weights"] != "fp32":
        g32 = race_result["gen_ratio_fp32"]
        print(f"  ours/theirs, generation with fp32 weights (ours {race_result['ours_gen_fp32']['median']:,.0f} "
              f"tokens/s): median {g32['median']:.2f}x (min {g32['min']:.2f}x, max {g32['max']:.2f}x)")


def print_server(sv: dict) -> None:
    failed = [e for row in sv["levels"] for e in row["errors"]]
    rows = [("requests", f"{sum(r['succeeded'] for r in sv['levels'])} of {sum(r['requests'] for r in sv['levels'])} "
             "succeeded" + (f"  !! FAILED: {'; '.join(failed[:5])}" if failed else "")),
            ("machine", f"{sv['cpu']}; load average {sv['load_average']} at the end" + load_note(sv["other_load"])),
            ("in-process, one at a time", f"{sv['direct_tokens_per_s']:,.0f} tokens/s (the same requests one after "
                                          f"another, {sv['threads']} thread(s), as the server uses)")]
    _table(f"Server under load ({sv['clients'] * sv['per_client']} streamed requests at each level on 127.0.0.1, "
           f"up to {sv['max_tokens']} tokens each, {sv['params'] / 1e6:.2f}M parameters)", rows)
    print(f"  {'streams':>7} {'in flight':>9} {'tokens/s':>9} {'vs 1 stream':>11} {'first token p50':>15} {'p95':>7} "
          f"{'errors':>6} {'no HTTP':>8} {'vs 1':>6}")
    for row in sv["levels"]:
        first, gain, alone_gain = row["first_token_s"], row["vs_one_stream"], row["worker_vs_one"]
        p50, p95 = (f"{first['p50']:.3f} s", f"{first['p95']:.3f} s") if first else ("-", "-")
        print(f"  {row['streams']:>7} {row['in_flight']:>9.1f} {row['tokens_per_s']:>9,.0f} "
              f"{f'{gain:.2f}x' if gain else '':>11} {p50:>15} {p95:>7} {row['requests'] - row['succeeded']:>6} "
              f"{row['worker_tokens_per_s']:>8,.0f} {f'{alone_gain:.2f}x' if alone_gain else '':>6}"
              + load_note(row["other_load"]))
    print("  (in flight: requests open at once on average, the sum of their durations over the level's time;"
          "\n   no HTTP: the same requests and clients through the server's worker in this process)")


def print_llama_race(r: dict) -> None:
    """Ours against llama.cpp, per GGUF type: the medians, the ratio of each round, the load."""
    print(f"\n== Race against llama.cpp ({r['arch']}, {r['params'] / 1e6:.2f}M parameters, {r['threads']} "
          f"thread(s) on both sides, {r['new_tokens']} tokens after a {r['prompt_tokens']}-token prompt, "
          f"{r['rounds']} alternating rounds)")
    print(f"  sampling: {r['sampling']}; ours: the menu's completion path with {r['ours_weights']} weights; "
          "llama.cpp: Llama.generate, each token detokenized")
    print(f"  load average {r['load_average_before']} before, {r['load_average_after']} after"
          + load_note(r["other_load"]))
    ours = r["ours"]
    print(f"  {'GGUF':<6} {'file MB':>8} {'llama.cpp tok/s':>16} {'ours tok/s':>11} {'ours/theirs':>12}  "
          "ratio in each round")
    for dtype, row in r["files"].items():
        if row["skipped"]:
            print(f"  {dtype:<6} {row['bytes'] / 1e6:>8.1f}  skipped: {row['skipped']}")
            continue
        rounds = " ".join(f"{x:.2f}" for x in row["ratio"]["all"])
        print(f"  {dtype:<6} {row['bytes'] / 1e6:>8.1f} {row['theirs']['median']:>16,.0f} {ours['median']:>11,.0f} "
              f"{row['ratio']['median']:>11.2f}x  {rounds}")
    if r.get("token_cost"):
        print_token_cost(r["token_cost"])
    if r.get("batched"):
        print_batched_race(r["batched"])


def print_batched_race(b: dict) -> None:
    """Both engines decoding several sequences at once: tokens/s and the gain over one sequence."""
    if b.get("skipped"):
        _note("Many sequences at once, against llama.cpp", f"skipped: {b['skipped']}")
        return
    print(f"\n== Many sequences at once ({b['threads']} thread(s) on both sides, {b['steps']} greedy steps after "
          f"a {b['prompt_tokens']}-token prompt, {b['dtype']} GGUF, medians of {b['rounds']} alternating rounds)")
    print("  ours: Decoder.step_many, the server's batched pass; llama.cpp: one llama_decode of every sequence's "
          "token a step" + ("" if b["every_sequence_same"] else "; OURS GAVE SEQUENCES DIFFERENT TOKENS"))
    print(f"  {'sequences':>9} {'ours tok/s':>11} {'vs one':>7} {'llama.cpp tok/s':>16} {'vs one':>7} {'ours/theirs':>12}")
    for row in b["levels"]:
        ours_gain = f"{row['ours_vs_one']:.2f}x" if row["ours_vs_one"] else ""
        theirs_gain = f"{row['theirs_vs_one']:.2f}x" if row["theirs_vs_one"] else ""
        print(f"  {row['sequences']:>9} {row['ours']:>11,.0f} {ours_gain:>7} {row['theirs']:>16,.0f} "
              f"{theirs_gain:>7} {row['ours_vs_theirs']:>11.2f}x")


def print_token_cost(c: dict) -> None:
    """What one of our tokens costs (CPU time of the generating thread) and where a step's time goes."""
    rows = [("a token", f"{c['token_us']:.0f} us ({c['threads']} thread(s), median of the replies)"),
            ("  decode step", f"{c['step_us']:.0f} us"),
            ("  sampling", f"{c['sampling_us']:.0f} us (top-k, top-p, the draw)"),
            ("  text streaming", f"{c['streaming_us']:.0f} us"),
            ("  the loop around them", f"{c['loop_us']:.0f} us")]
    kinds = c["step_by_kind"]
    profiled = kinds["profiled step"]
    rows += [(f"  step: {kind}", f"{us:.0f} us ({us / profiled:.0%})") for kind, us in kinds.items()
             if kind != "profiled step"]
    _table(f"Where a token's time goes ({c['tokens']} tokens; the step's split from torch.profiler, which adds "
           f"~1 us an op: {profiled:.0f} us a profiled step)", rows)


def print_quality(q: dict) -> None:
    c, h = q["config"], q.get("half_weights")
    rows = [
        ("validation bits/byte", f"{q['val_bpb']:.3f}  (classic small-GPT recipe: 2.72; target <= 2.5)"
         + load_note(q["other_load"])),
        ("validation loss", f"{q['val_loss']:.3f} nats/token"),
        ("steps, tokens", f"{q['steps']} steps, {q['tokens_seen']:,} tokens ({q['stopped']})"),
        ("setup", f"d_model {c['d_model']}, {c['n_layer']} layers, context {c['context']}, vocab {c['vocab']}, "
                  f"batch {c['batch']}, lr {c['lr']:g}, warm-up {c['warmup_steps']}, {c['precision']}")]
    if h:
        rows.append(("generation, fp16 weights", f"{h['fp16_bits_per_token']:.4f} vs {h['fp32_bits_per_token']:.4f} "
                     f"bits/token with fp32 weights; same top token {h['top1_agreement']:.2%} "
                     f"({h['tokens']} held-out tokens)"))
    _table(f"Quality per minute ({q['minutes'] * 60:.0f} s on tinyshakespeare, default CPU setup)", rows)


def print_report(r: dict) -> None:
    """Every section that ran, in a fixed order; a section skipped for a reason says why."""
    print_environment(r["environment"])
    print_matmul(r["matmul"])
    if r.get("cpu_isa"):
        print_cpu_isa(r["cpu_isa"])
    for t in r["training"]:
        print_training(t)
    if r.get("generation"):
        print_generation(r["generation"])
    if r.get("data"):
        print_data(r["data"])
    elif r.get("data_note"):
        _note("Data path", r["data_note"])
    ref, race_result = r.get("reference", {}), r.get("race", {})
    if ref.get("skipped"):
        _note("Race against the reference", f"skipped: {ref['skipped']}")
    elif race_result.get("rounds"):
        print_race(race_result, ref)
    if r.get("server"):
        print_server(r["server"])
    elif r.get("server_note"):
        _note("Server under load", r["server_note"])
    llama = r.get("llama_cpp", {})
    if llama.get("skipped") or r.get("llama_cpp_note"):
        _note("Race against llama.cpp", f"skipped: {llama.get('skipped') or r['llama_cpp_note']}")
    elif llama:
        print_llama_race(llama)
    if r.get("quality"):
        print_quality(r["quality"])
