"""Cells of colab/quickstart.ipynb: the embedded model at several device-expert fractions."""

TITLE = "emoe_jax quickstart: generate with a fraction of the experts on the device"

INTRO = """
`emoe_jax` runs Mixture-of-Experts language models whose experts do not all fit
on the accelerator. Each MoE layer keeps only S of its E experts in a device
slot cache; the others wait in host memory or on disk and are fetched when a
token is routed to them. In the default **exact** mode this changes the speed,
not the computation: results differ only by floating-point rounding (checked
below).

This notebook uses the small model that ships with the repository
(`checkpoints/embedded`: 8 MoE layers x 32 experts, top-4, 13.8 M parameters,
trained on this project's multi-task corpus), generates text with 12.5 %, 25 %,
50 % and 100 % of its experts on the device, and plots speed and device
memory against that fraction.
"""

SIZES = r'''
# New tokens per prompt and timed repetitions per fraction.
NEW_TOKENS, REPEATS = {"small": (16, 1), "cpu": (32, 3), "accelerator": (64, 3)}[SIZE]
print(f"sizes: {SIZE}: {NEW_TOKENS} new tokens, {REPEATS} timed run(s) per fraction")
'''

CELLS = [
    ("md", """
## Load the embedded model

A converted checkpoint is a directory: dense weights (Orbax), routed experts
(TensorStore, one chunk per expert), config, tokenizer and a manifest.
`emoe_jax.load` opens it lazily.
"""),
    ("code", r'''
MODEL = REPO / "checkpoints" / "embedded"
ckpt = emoe_jax.load(MODEL)
cfg, manifest = ckpt.config, ckpt.manifest
tok = ckpt.tokenizer
print(f"{cfg.family}: {cfg.num_layers} layers, {cfg.num_experts} experts per MoE layer, top-{cfg.top_k}, "
      f"hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}")
print(f"one expert (gate + up + down): {manifest['expert_bytes'] / 2**10:.0f} KiB, "
      f"all {cfg.num_moe_layers * cfg.num_experts} experts: {manifest['all_expert_bytes'] / 2**20:.1f} MiB "
      f"({manifest['dtype']})")
'''),
    ("md", """
## Generate with a quarter of the experts on the device

`device_experts` is the number of slots per MoE layer: a fraction of E (0.25
gives 8 of 32), a count, or one value per layer. `generate` takes token-id
lists (a batch) and returns the new tokens and per-call statistics. The
first call compiles the jitted stages for these shapes, so its timings
include compilation.
"""),
    ("code", r'''
engine = emoe_jax.OffloadedEngine.from_checkpoint(MODEL, device_experts=0.25)
PROMPT = "def fibonacci(n):"
out = engine.generate([tok.encode(PROMPT)], max_new_tokens=NEW_TOKENS)
print(PROMPT + tok.decode(out.tokens[0]))
'''),
    ("md", """
The statistics of that call: tokens per second (prefill and decode), the
device tier's hits and misses, bytes moved host -> device and disk -> host,
the time stalled on misses and the number of XLA compilations.
"""),
    ("code", r'''
def show_stats(stats, keys=None):
    """Print a flat view of a stats dict (nested dicts as a.b)."""
    flat = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    for k in keys or flat:
        v = flat[k]
        print(f"{k:32s} {v:,.3f}" if isinstance(v, float) else f"{k:32s} {v}")


show_stats(out.stats, ["prefill_tokens", "prefill_tokens_per_s", "decode_tokens", "decode_tokens_per_s",
                       "device_slots_per_layer", "device_expert_bytes", "all_expert_bytes", "device_hit_rate",
                       "device.hits", "device.misses", "h2d_bytes", "disk_to_host_bytes", "stall_s", "compiles"])
print()
show_stats(engine.memory_report())
'''),
    ("md", """
## Sweep the fraction of experts on the device

For each fraction: a new engine, a warm-up call per prompt (compiles that
cache size's shapes), then timed calls over three prompts; the table shows
the median of the repetitions (in small mode a single short run over two
fractions, so the speeds are noisy). The device cache stays warm between calls, as it would in a server.
The engine computes in the checkpoint's dtype, bfloat16.
"""),
    ("code", r'''
import statistics

FRACTIONS = [0.125, 1.0] if SMALL else [0.125, 0.25, 0.5, 1.0]  # each fraction compiles its own step
PROMPTS = ["def fibonacci(n):", "The government announced on Monday that", "Der Hund und die Katze"]
prompt_ids = [tok.encode(p) for p in PROMPTS]  # 9-10 tokens each: one compiled prompt-length bucket

rows, texts = [], {}
for frac in FRACTIONS:
    eng = emoe_jax.OffloadedEngine.from_checkpoint(MODEL, device_experts=frac)
    for ids in prompt_ids:  # warm-up: compile this cache size's shapes
        eng.generate([ids], max_new_tokens=NEW_TOKENS)
    speeds, hits, stalls = [], [], []
    for _ in range(REPEATS):
        n_tok = secs = stall = 0.0
        accesses = hit = 0
        texts[frac] = []
        for ids in prompt_ids:
            res = eng.generate([ids], max_new_tokens=NEW_TOKENS)
            s = res.stats
            n_tok, secs, stall = n_tok + s["decode_tokens"], secs + s["decode_s"], stall + s["stall_s"]
            hit += s["device"]["hits"]
            accesses += s["device"]["hits"] + s["device"]["misses"]
            texts[frac].append(res.tokens[0])
        speeds.append(n_tok / secs)
        hits.append(hit / max(accesses, 1))
        stalls.append(1e3 * stall / n_tok)
    mem = eng.memory_report()
    rows.append(dict(fraction=frac, slots=eng.num_slots, decode_tok_s=statistics.median(speeds),
                     hit_rate=statistics.median(hits), stall_ms_per_tok=statistics.median(stalls),
                     expert_mib=mem["slot_buffer_bytes"] / 2**20, dense_mib=mem["dense_param_bytes"] / 2**20))

print(f"{'fraction':>8} {'slots':>5} {'decode tok/s':>12} {'hit rate':>8} {'stall ms/tok':>12} "
      f"{'experts MiB':>11} {'dense MiB':>9} {'same tokens as 1.0':>18}")
for r in rows:
    same = sum(a == b for a, b in zip(texts[r["fraction"]], texts[1.0]))
    print(f"{r['fraction']:8.3f} {r['slots']:5d} {r['decode_tok_s']:12.1f} {r['hit_rate']:8.1%} "
          f"{r['stall_ms_per_tok']:12.2f} {r['expert_mib']:11.2f} {r['dense_mib']:9.2f} "
          f"{f'{same} of {len(PROMPTS)} prompts':>18}")
print()
for p, t in zip(PROMPTS, texts[0.125]):
    print(repr(p + tok.decode(t)))
'''),
    ("md", """
## Exact mode: the same tokens whatever the fraction

In exact mode every expert a token is routed to is fetched before its layer
runs, so the computation is the all-resident model's. What can differ is
rounding: with fewer slots than a step needs, the experts stream through the
slots in waves whose partial sums are added in a different order. In bfloat16
that moves the logits by up to a few tenths, and a prompt whose top two
tokens are that close can continue differently (the last column above shows
when this happened). In float32 the rounding differences are around 1e-5, and
the tokens agree; the next cell checks it with 12.5 % of the experts against
all of them.
"""),
    ("code", r'''
import jax.numpy as jnp
import numpy as np

few = emoe_jax.OffloadedEngine.from_checkpoint(MODEL, device_experts=0.125, dtype=jnp.float32)
full = emoe_jax.OffloadedEngine.from_checkpoint(MODEL, device_experts=1.0, dtype=jnp.float32)
for p, ids in zip(PROMPTS, prompt_ids):
    a = few.generate([ids], max_new_tokens=NEW_TOKENS, return_logits=True)
    b = full.generate([ids], max_new_tokens=NEW_TOKENS, return_logits=True)
    assert a.tokens == b.tokens, f"float32: {p!r} continued differently with 12.5 % of the experts"
    gap = float(np.abs(a.logits - b.logits).max())
    print(f"{p!r}: same {len(a.tokens[0])} tokens, largest logit difference {gap:.1e}")
'''),
    ("md", """
## Plot: speed and device memory against the fraction

Device expert memory falls in proportion to the fraction; the dense weights
(attention, norms, embeddings, routers) stay on the device whatever it is.
Speed falls with the hit rate, because every miss waits for a transfer.
"""),
    ("code", r'''
import matplotlib.pyplot as plt

fr = [r["fraction"] for r in rows]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(fr, [r["decode_tok_s"] for r in rows], "o-")
for r in rows:
    ax1.annotate(f"hit {r['hit_rate']:.0%}", (r["fraction"], r["decode_tok_s"]),
                 textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
ax1.margins(y=0.15)
ax1.set(xlabel="experts on the device (fraction of each layer's)", ylabel="decode tokens/s",
        title=f"decode speed, batch 1 ({PLATFORM})")
ax2.bar([str(f) for f in fr], [r["expert_mib"] for r in rows], label="expert slot buffers")
ax2.bar([str(f) for f in fr], [r["dense_mib"] for r in rows], bottom=[r["expert_mib"] for r in rows],
        label="dense weights")
ax2.set(xlabel="experts on the device (fraction)", ylabel="MiB on the device", title="device memory")
ax2.legend()
fig.tight_layout()
plt.show()
'''),
    ("md", """
## What the numbers mean

- On a CPU runtime the "device" is host memory too, so the speed loss shows
  the cost of the slot machinery and the per-layer sync, not of a PCIe link.
  On a GPU or TPU a miss crosses the host link; predictors that prefetch
  experts early (`predictor_lab.ipynb`) aim to hide that.
- The embedded model is tiny (an expert is 90 KiB), so per-step overheads
  dominate; with a real model (`hf_models.ipynb`) the transfer time does.
- The same job from a shell:
  `python -m emoe_jax.generate --prompt "def fibonacci(n):" --device-experts 0.25 --json`.
"""),
]
