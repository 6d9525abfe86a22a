"""Cells of colab/predictor_lab.ipynb: real DeepSeek-V2-Lite traces, the learned predictor, hit rate vs capacity."""

TITLE = "Predictor lab: which experts to keep, which to fetch early"

INTRO = """
An offloading runtime keeps a cache of experts on the device. Two things
decide how often a routed expert is already there: the **eviction policy**
(which resident expert to drop) and the **predictor** (which experts to fetch
before the router asks for them). This notebook replays real routing traces of
DeepSeek-V2-Lite (26 MoE layers x 64 experts, top-6; recorded by the
MoE-Beyond authors) in `emoe_jax`'s simulator, trains the learned predictor
(MoE-Beyond's idea, with its flaws fixed: strictly causal, no peeking at the
layer's own router input), and compares hit rates against cache capacity for

- **LRU**: no prefetch, least-recently-used eviction (the floor);
- **MIN / Belady**: no prefetch, the optimal eviction (reads the future: an oracle);
- **static frequency**: prefetch each layer's most used experts of the training prompts;
- **learned**: the predictor trained here (and, with the real traces, the
  repository's checkpoint trained for 29 minutes);
- **oracle prefetch**: perfect knowledge of the coming experts (an oracle).

Each is scored twice: in MoE-Beyond's protocol, where moving an expert takes
no time, and with a 25 GB/s link that takes 0.69 ms per 17.3 MB expert while a
layer computes for an assumed 0.5 ms.
"""

SIZES = r'''
# import_limit: import only the N lowest prompt ids (None: all); train/val_prompts: first N of each
# side of the split (None: all); steps/batch/row_len/net: the learned predictor's training.
LAB = {
    "small": dict(import_limit=100, synthetic_prompts=60, train_prompts=None, val_prompts=None, steps=30,
                  batch=4, row_len=64, capacities=[0.05, 0.1, 0.2],
                  net=dict(d_model=32, num_heads=2, mlp_hidden=64, window=64, context_layers=1, step_blocks=1)),
    "cpu": dict(import_limit=None, synthetic_prompts=200, train_prompts=None, val_prompts=150, steps=100,
                batch=8, row_len=256, capacities=[0.025, 0.05, 0.1, 0.2, 0.3, 0.5], net=dict()),
    "accelerator": dict(import_limit=None, synthetic_prompts=200, train_prompts=None, val_prompts=None,
                        steps=800, batch=16, row_len=256, capacities=[0.025, 0.05, 0.1, 0.2, 0.3, 0.5],
                        net=dict()),
}[SIZE]
print(f"sizes: {SIZE}: {LAB}")
'''

CELLS = [
    ("md", """
## The traces

The shared data set `deepseek-v2-lite-puffin/traces.tar.gz` (1,999 prompts,
192,023 tokens) is looked for in `shared/data/` beside the repository. On
Colab, upload it (or a directory of `prompt_<N>_data.csv` files from the
MoE-Beyond repository, github.com/ngavhane/moe-beyond, folder
`training_data_eamc/`) and set `TRACES_SRC` or `EMOE_PUFFIN_TRACES` to its
path; a trace set imported before (`python -m emoe_jax.traces import-moe-beyond`)
works too.

If neither is there, the notebook writes **synthetic traces** with the public
trace writer (8 layers x 32 experts, top-4; routing with task, token,
token-to-token and layer-to-layer structure) and says so: the cells run the
same, but the figures then say nothing about a real model.
"""),
    ("code", r'''
import numpy as np
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet, TraceWriter, import_moe_beyond

TRACES_SRC = Path(os.environ.get("EMOE_PUFFIN_TRACES")
                  or REPO.parent / "shared" / "data" / "deepseek-v2-lite-puffin" / "traces.tar.gz")


def write_synthetic_traces(path, prompts=200, layers=8, experts=32, top_k=4, seed=0):
    """Routing with the structure predictors exploit: per-task preferences, token identity,
    persistence from the previous token and correlation with the previous layer."""
    rng = np.random.default_rng(seed)
    tasks = ["code", "dialogue", "math"]
    prefs = rng.dirichlet(np.full(experts, 0.3), size=(len(tasks), layers))  # [tasks, L, E]
    meta = TraceMeta(model="synthetic", num_layers=layers, num_experts=experts, top_k=top_k,
                     moe_layer_ids=tuple(range(layers)), hidden_size=None,
                     source="synthetic traces written by colab/predictor_lab.ipynb")
    with TraceWriter(path, meta, overwrite=True) as writer:
        for pid in range(prompts):
            task = (pid // 10) % len(tasks)  # runs of 10 prompts share a task, like conversations
            n = int(rng.integers(40, 120))
            token_ids = rng.integers(0, 400, n).astype(np.int32)
            routing = np.zeros((n, layers, top_k), np.int16)  # [T, L, k]
            for t in range(n):
                for l in range(layers):
                    p = prefs[task, l].copy()
                    p[(int(token_ids[t]) * 7 + l) % experts] += 0.3  # token identity
                    if t:
                        p[routing[t - 1, l]] += 0.15  # the previous token's experts
                    if l:
                        p[(routing[t, l - 1].astype(int) * 5 + 3) % experts] += 0.1  # the layer below
                    routing[t, l] = rng.choice(experts, size=top_k, replace=False, p=p / p.sum())
            writer.add(PromptTrace(prompt_id=pid, task=tasks[task], text="", token_ids=token_ids,
                                   experts=routing, weights=None, n_prefill=n))
    return TraceSet.load(path)


REAL = TRACES_SRC.exists()
if not REAL:
    print(f"No DeepSeek-V2-Lite traces at {TRACES_SRC}: using SYNTHETIC traces. "
          "The figures below then show how the lab works, not how real predictors do.")
    traces = write_synthetic_traces(WORK / "synthetic_traces", prompts=LAB["synthetic_prompts"])
elif (TRACES_SRC / "meta.json").exists():  # a trace set imported before
    traces = TraceSet.load(TRACES_SRC)
else:  # the MoE-Beyond CSVs: import them (about 10-20 s for all 1,999 prompts)
    import_moe_beyond(TRACES_SRC, WORK / "puffin_traces", limit=LAB["import_limit"], overwrite=True,
                      progress=not SMALL)
    traces = TraceSet.load(WORK / "puffin_traces")
meta = traces.meta
print(f"{'real' if REAL else 'synthetic'} traces of {meta.model}: {len(traces)} prompts, {traces.n_tokens:,} tokens, "
      f"{meta.num_layers} MoE layers x {meta.num_experts} experts, top-{meta.top_k}")
'''),
    ("md", """
## Train / validation split

By prompt id: the lowest 80 % train, the highest 20 % validate
(`emoe_jax.traces.split_by_prompt_id`; contiguous, because consecutive prompts
are often turns of one conversation). The repository's learned checkpoint was
trained on exactly this training side of all 1,999 prompts, so the validation
prompts are unseen by both predictors. (Small mode imports only the first 100
prompts, which that checkpoint trained on, so it is left out there.)

How concentrated is the routing? A static-frequency prefetcher bets that a
few experts per layer take most of a layer's load; the heatmap shows how far
that holds.
"""),
    ("code", r'''
import matplotlib.pyplot as plt
from emoe_jax.sim import split_by_prompt_id

train, val = split_by_prompt_id(traces, 0.2)
if LAB["train_prompts"]:
    train = train.select(slice(0, LAB["train_prompts"]))
if LAB["val_prompts"]:
    val = val.select(slice(0, LAB["val_prompts"]))
for side, ts in (("train", train), ("validation", val)):
    print(f"{side}: {len(ts)} prompts ({ts.n_tokens:,} tokens), ids {ts.prompt_ids.min()}-{ts.prompt_ids.max()}")

L, E, K = meta.num_layers, meta.num_experts, meta.top_k
counts = np.zeros((L, E), np.int64)  # [L, E] activations per layer and expert
for p in train:
    ex = np.asarray(p.experts).astype(np.int64)  # [T, L, k]
    counts += np.stack([np.bincount(ex[:, l].ravel(), minlength=E) for l in range(L)])
share = -np.sort(-counts, axis=1) / counts.sum(1, keepdims=True)  # [L, E], experts by load
fig, ax = plt.subplots(figsize=(8, 3))
im = ax.imshow(share, aspect="auto", cmap="viridis")
ax.set(xlabel="experts of the layer, most used first", ylabel="MoE layer", title="share of a layer's routing")
fig.colorbar(im, ax=ax)
plt.show()
top = max(1, E // 10)
print(f"the top 10 % of experts ({top} per layer) take {share[:, :top].sum(1).mean():.0%} of the routing on average")
'''),
    ("md", """
## Train the learned predictor

At step (token t, layer l), before layer l routes, the network knows the token
ids up to t, the routing of earlier tokens and token t's routing at layers
below l; it predicts the experts of layer l and of the next few steps. It is
trained with masked multi-label BCE (AdamW, cosine schedule) on packed rows of
the training prompts. The sizes here are brief (see the sizes cell); the
repository's checkpoint trained 804 steps in 29 minutes on a CPU. On a CPU
runtime the 100 steps here (about 4 minutes on 2 cores) stay near the loss of
predicting each expert's overall frequency (about 0.31), so that predictor is
no better than static frequency; raise `LAB["steps"]` to a few hundred, or use
an accelerator runtime (800 steps).
"""),
    ("code", r'''
from emoe_jax.predict import get_predictor
from emoe_jax.predict.learned import DEFAULT_CHECKPOINT, LearnedConfig, TrainSettings, save, train_model

net = LearnedConfig(num_layers=L, num_experts=E, top_k=K, token_buckets=2048, **LAB["net"])
settings = TrainSettings(steps=LAB["steps"], batch_size=LAB["batch"], row_len=LAB["row_len"],
                         warmup=max(LAB["steps"] // 10, 1), log_every=max(LAB["steps"] // 20, 1))
result = train_model(train, net, settings, progress=not SMALL)
BRIEF = save(WORK / "learned-brief", result.model, {"steps": result.steps_done, "seconds": result.seconds})
LEARNED = {"learned (trained here)": str(BRIEF)}
if REAL and LAB["import_limit"] is None and DEFAULT_CHECKPOINT.exists():
    LEARNED["learned (repository checkpoint)"] = str(DEFAULT_CHECKPOINT)
print(f"{result.params:,} parameters, {result.steps_done} steps in {result.seconds:.1f} s "
      f"on {result.train_rows} packed rows ({result.train_tokens:,} tokens) -> {BRIEF}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([h["step"] for h in result.history], [h["loss"] for h in result.history], "o-")
ax.set(xlabel="step", ylabel="masked BCE", title="training loss")
plt.show()
'''),
    ("md", """
## Hit rate against capacity

Capacity is a fraction of all L x E layer-experts, in one pool shared by the
layers. Every (predictor, protocol) pair replays the same validation prompts;
a predictor's per-prompt predictions are computed once and reused across
capacities (they depend on the routing, never on what is cached). The
simulator also scores the predictions themselves: recall@k is the share of the
k experts each (token, layer) really used that are among the predictor's top
k, over real tokens only, at distance 0 (the layer about to route) and 1 (the
next step).
"""),
    ("code", r'''
from emoe_jax.bench.predictors import MemoisedPredictor
from emoe_jax.sim import SimConfig, simulate
from tqdm.auto import tqdm

EXPERT_BYTES = 17.3e6  # one DeepSeek-V2-Lite expert in bf16 (3 x 2048 x 1408 x 2 bytes)
PROTOCOLS = {
    "zero latency (MoE-Beyond)": lambda cap: SimConfig.moe_beyond(capacity=cap),
    "25 GB/s link": lambda cap: SimConfig(capacity=cap, bandwidth_gbps=25.0, expert_bytes=EXPERT_BYTES,
                                          layer_compute_ms=0.5),
}
PREDICTORS = {"LRU": ("lru", {}), "MIN (Belady)": ("belady", {}), "static frequency": ("static-freq", {}),
              **{label: ("learned", {"checkpoint": path}) for label, path in LEARNED.items()},
              "oracle prefetch": ("oracle-prefetch", {})}
CAPACITIES = LAB["capacities"]

rows = []
bar = tqdm(total=len(PREDICTORS) * len(PROTOCOLS) * len(CAPACITIES), desc="simulations", disable=SMALL)
for label, (name, kwargs) in PREDICTORS.items():
    built = {}  # lookahead -> fitted, memoised predictor
    for protocol, make_config in PROTOCOLS.items():
        for cap in CAPACITIES:
            config = make_config(cap)
            la = config.lookahead_layers
            if la not in built:
                predictor = get_predictor(name, ignore_unknown=True, lookahead=la, **kwargs)
                predictor.fit(train)
                built[la] = MemoisedPredictor(predictor)
            r = simulate(val, built[la], config).to_dict()
            rows.append(dict(predictor=label, protocol=protocol, capacity=cap, hit_rate=r["hit_rate"],
                             stall_ms=r["stall_ms_per_token"], oracle=r["oracle"],
                             recall=r["prediction"].get(f"recall@{K}_per_distance")))
            bar.update()
bar.close()
print(f"{len(rows)} simulations over {len(val)} validation prompts")
for label, (name, _) in PREDICTORS.items():
    rec = next(r["recall"] for r in rows if r["predictor"] == label and r["protocol"] == "25 GB/s link")
    if name not in ("lru", "belady"):  # these never predict
        print(f"{label:34s} recall@{K} at distance 0, 1: " + ", ".join(f"{x:.1%}" for x in rec))
'''),
    ("code", r'''
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
panels = [("zero latency (MoE-Beyond)", "hit_rate", "hit rate, transfers free"),
          ("25 GB/s link", "hit_rate", "hit rate, 25 GB/s link"),
          ("25 GB/s link", "stall_ms", "stall per token (ms), 25 GB/s link")]
for ax, (protocol, key, title) in zip(axes, panels):
    for label in PREDICTORS:
        pts = [r for r in rows if r["predictor"] == label and r["protocol"] == protocol]
        style = "--" if pts[0]["oracle"] else "-"
        ax.plot([r["capacity"] for r in pts], [r[key] for r in pts], style, marker="o", label=label)
    ax.set(xlabel="capacity (fraction of all experts)", title=title)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("hit rate")
axes[-1].legend(fontsize=8)
fig.suptitle(f"{'DeepSeek-V2-Lite' if REAL else 'SYNTHETIC'} traces, {len(val)} validation prompts "
             "(dashed: oracles)")
fig.tight_layout()
plt.show()

cap = min(CAPACITIES, key=lambda c: abs(c - 0.1))
print(f"at capacity {cap:.0%}:")
print(f"{'predictor':34s} {'zero-latency hit':>16} {'25 GB/s hit':>12} {'stall ms/token':>15}")
for label in PREDICTORS:
    zl, timed = (next(r for r in rows if r["predictor"] == label and r["protocol"] == p and r["capacity"] == cap)
                 for p in PROTOCOLS)
    print(f"{label:34s} {zl['hit_rate']:16.1%} {timed['hit_rate']:12.1%} {timed['stall_ms']:15.1f}")
'''),
    ("md", """
## Reading the plots

- With free transfers (MoE-Beyond's protocol) a good predictor beats LRU and
  even MIN, because it loads experts just before they are needed.
- With a real link, moving one expert (0.69 ms) takes longer than a layer
  computes (0.5 ms, assumed), so prefetches arrive late and push out experts
  that demand fetches then have to bring back: at small capacities most
  predictors lose to LRU, and the oracle prefetcher shows the ceiling.
- On the whole data set (docs/predictors.md, docs/ablations.md) the repository's
  learned checkpoint reaches 51 % at 10 % capacity with free transfers
  (LRU 26 %, MIN 49 %) and recall@6 of 52 %; one trained briefly here is far
  weaker.
- Shell equivalents: `python -m emoe_jax.sim --traces DIR --predictor learned --split --zero-latency`
  and the full grid `python -m emoe_jax.bench predictors --traces DIR`.
"""),
]
