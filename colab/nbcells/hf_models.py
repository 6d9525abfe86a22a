"""Cells of colab/hf_models.ipynb: a real Hugging Face MoE (or a tiny local one offline), converted and run."""

TITLE = "Real Hugging Face MoE models with offloaded experts"

INTRO = """
This notebook downloads a real Mixture-of-Experts checkpoint from the Hugging
Face Hub, converts it into `emoe_jax`'s layout (dense weights with Orbax,
routed experts with TensorStore, one chunk per expert), and generates with only
a fraction of its experts on the accelerator.

Offline (no Hub access, or `EMOE_NOTEBOOK_OFFLINE=1`, or the small mode CI
uses) the same cells run on a tiny random Qwen3-MoE model built here with
`transformers`, and a last cell checks that the offloaded engine generates
exactly the tokens `transformers` does.
"""

SIZES = r'''
# New tokens per prompt; which Hub model to try (any supported family works).
NEW_TOKENS = {"small": 12, "cpu": 24, "accelerator": 48}[SIZE]
HF_MODEL = os.environ.get("EMOE_HF_MODEL", "allenai/OLMoE-1B-7B-0924")
print(f"sizes: {SIZE}: {NEW_TOKENS} new tokens; Hub model: {HF_MODEL}")
'''

CELLS = [
    ("md", """
## Which models, and what they need

Supported families: Mixtral, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE, OLMoE and
DeepSeek-V2 (MLA attention, YaRN). The table is computed from each model's
published configuration (bfloat16, 2 bytes a parameter); it is arithmetic, not
a measurement. "Device" is what the accelerator must hold with a quarter of
each layer's experts: the dense weights plus the expert slots (add the KV
cache and XLA's scratch on top). "Disk" is the download plus the converted
copy. The converter streams tensor by tensor, so its RAM stays near the size
of the largest tensor (docs/checkpoint.md).
"""),
    ("code", r'''
# name: (total params, hidden H, expert intermediate I, MoE layers, experts E, top-k)
MODELS = {
    "allenai/OLMoE-1B-7B-0924":     (6.92e9, 2048, 1024, 16, 64, 8),
    "Qwen/Qwen1.5-MoE-A2.7B":       (14.3e9, 2048, 1408, 24, 60, 4),
    "deepseek-ai/DeepSeek-V2-Lite": (15.7e9, 2048, 1408, 26, 64, 6),
    "Qwen/Qwen3-30B-A3B":           (30.5e9, 2048,  768, 48, 128, 8),
    "mistralai/Mixtral-8x7B-v0.1":  (46.7e9, 4096, 14336, 32, 8, 2),
}
GB = 1e9
print(f"{'model':30s} {'params':>7} {'layers x E, k':>14} {'1 expert':>9} {'experts':>8} {'dense':>7} "
      f"{'device @25%':>11} {'disk':>6}")
for name, (total, h, i, layers, e, k) in MODELS.items():
    expert = 3 * h * i * 2  # gate, up, down in bf16
    experts = expert * layers * e
    dense = total * 2 - experts
    print(f"{name:30s} {total / 1e9:6.1f}B {f'{layers} x {e}, {k}':>14} {expert / 1e6:7.1f}MB "
          f"{experts / GB:6.1f}GB {dense / GB:5.1f}GB {(dense + 0.25 * experts) / GB:9.1f}GB "
          f"{2 * total * 2 / GB:4.0f}GB")
'''),
    ("md", """
Reading the table for Colab: OLMoE-1B-7B fits every runtime (a T4 holds it
even with half its experts on the device; 28 GB of disk). Qwen1.5-MoE-A2.7B and
DeepSeek-V2-Lite need about 10 GB of device memory at 25 % and 60 GB of disk.
Qwen3-30B-A3B needs an L4 or A100 at 25 %, Mixtral-8x7B an A100 (or fewer
experts on the device) and about 190 GB of disk. With less host RAM than the experts, the host
tier holds part of them and the rest is read from disk on demand. This
project tested conversion and parity on tiny random models of every family;
the real checkpoints were not downloaded here (no Hub access on its machines).

## Online or offline

Set `EMOE_HF_MODEL` to another repository id to try it, or
`EMOE_NOTEBOOK_OFFLINE=1` to skip the Hub.
"""),
    ("code", r'''
def hub_reachable(repo_id, timeout=5.0):
    """True if the Hub answers for repo_id within `timeout` seconds."""
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(repo_id, timeout=timeout)
        return True
    except Exception as exc:  # offline, timeout, gated or unknown repo: all mean "use the local model"
        print(f"Hugging Face Hub not usable for {repo_id} ({type(exc).__name__}: {str(exc)[:120]})")
        return False


OFFLINE = SMALL or os.environ.get("EMOE_NOTEBOOK_OFFLINE") == "1"
USE_HUB = not OFFLINE and hub_reachable(HF_MODEL)
print("using", HF_MODEL if USE_HUB else "a tiny local Qwen3-MoE model (offline)")
'''),
    ("md", """
## Download (online)

Only the files the converter reads: `config.json`, the safetensors shards and
their index, tokenizer files.
"""),
    ("code", r'''
if USE_HUB:
    from huggingface_hub import snapshot_download

    HF_DIR = Path(snapshot_download(HF_MODEL, local_dir=WORK / "hf" / HF_MODEL.split("/")[-1],
                                    allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    size = sum(f.stat().st_size for f in HF_DIR.rglob("*") if f.is_file())
    print(f"{HF_DIR}: {size / 1e9:.1f} GB")
else:
    print("offline: skipped")
'''),
    ("md", """
## Build a tiny model (offline)

A random Qwen3-MoE (4 layers x 16 experts, top-4, hidden 64) saved with
`save_pretrained`, exactly the files a Hub download has. It borrows the
embedded model's tokenizer (vocabulary 4096) so text goes in and out; being
random, it writes nonsense. Random routers are almost uniform, so their
weights are scaled up to make each token's top-k choice clear-cut.
"""),
    ("code", r'''
if not USE_HUB:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        raise RuntimeError("the offline tiny model is built with transformers and torch: "
                           "pip install torch transformers (or pip install -e '.[test]'), then rerun")
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    hf_model = transformers.Qwen3MoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # the routers: [E, H]
                param.mul_(20.0)
    HF_DIR = WORK / "hf" / "tiny-qwen3-moe"
    hf_model.save_pretrained(HF_DIR)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REPO / "checkpoints" / "embedded" / name, HF_DIR / name)
    print(sorted(p.name for p in HF_DIR.iterdir()))
'''),
    ("md", """
## Convert

`emoe_jax.convert_hf_checkpoint` (or `python -m emoe_jax.convert HF_DIR OUT`)
streams the safetensors into the project's layout. It refuses config fields
it does not implement, naming them, and resumes if interrupted. Real models
are stored in bfloat16; the tiny one in float32 for the exactness check below.
"""),
    ("code", r'''
def human(n):
    """Bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


OUT = WORK / "converted" / HF_DIR.name
summary = emoe_jax.convert_hf_checkpoint(HF_DIR, OUT, dtype="bfloat16" if USE_HUB else "float32",
                                         progress=not SMALL)
ckpt = emoe_jax.load(OUT)
cfg, manifest = ckpt.config, ckpt.manifest
dense_bytes = sum(f.stat().st_size for f in (OUT / "dense").rglob("*") if f.is_file())
print(f"{cfg.family}: {cfg.num_layers} layers ({cfg.num_moe_layers} MoE) x {cfg.num_experts} experts, "
      f"top-{cfg.top_k}, {manifest['dtype']}")
print(f"one expert {human(manifest['expert_bytes'])}, all experts {human(manifest['all_expert_bytes'])}, "
      f"dense weights {human(dense_bytes)}")
'''),
    ("md", """
## How many experts go on the device

On a GPU or TPU the fraction is what fits in 70 % of the device memory after
the dense weights, capped at 25 % so that the run really offloads (set
`EMOE_DEVICE_EXPERTS` to choose). On CPU it is 25 %. The host tier keeps as
many experts as half the host memory holds; the rest are read from disk when
needed.
"""),
    ("code", r'''
all_bytes, expert_bytes = manifest["all_expert_bytes"], manifest["expert_bytes"]
if os.environ.get("EMOE_DEVICE_EXPERTS"):
    DEVICE_EXPERTS = float(os.environ["EMOE_DEVICE_EXPERTS"])
elif DEVICE_BYTES:
    fits = (0.7 * DEVICE_BYTES - dense_bytes) / all_bytes
    if fits * cfg.num_experts < 1:
        raise RuntimeError(f"the dense weights ({dense_bytes / 2**30:.1f} GiB) leave no room for one expert per "
                           f"layer in {DEVICE_BYTES / 2**30:.1f} GiB; pick a smaller model or a larger runtime")
    DEVICE_EXPERTS = min(fits, 0.25)
else:
    DEVICE_EXPERTS = 0.25
host_fit = int(0.5 * HOST_BYTES // expert_bytes)
HOST_EXPERTS = None if host_fit >= cfg.num_moe_layers * cfg.num_experts else host_fit  # None: all
slots = max(1, int(DEVICE_EXPERTS * cfg.num_experts))
print(f"device: {slots} of {cfg.num_experts} experts per layer ({human(slots * cfg.num_moe_layers * expert_bytes)}); "
      f"host tier: {'all experts' if HOST_EXPERTS is None else f'{HOST_EXPERTS} experts'}")
'''),
    ("md", """
## Generate

A batch of two prompts (left-padded), greedy. The statistics show how many
routed experts were found on the device and how much was moved.
"""),
    ("code", r'''
engine = emoe_jax.OffloadedEngine.from_checkpoint(OUT, device_experts=slots, host_experts=HOST_EXPERTS)
tok = engine.checkpoint.tokenizer
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
out = engine.generate([tok.encode(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
for p, t in zip(PROMPTS, out.tokens):
    print(repr(p + tok.decode(t)))
s = out.stats
print(f"\nprefill {s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s "
      f"(first call: includes compilation)")
print(f"device hit rate {s['device_hit_rate']:.1%}, host hit rate {s['host_hit_rate']:.1%}, "
      f"host->device {s['h2d_bytes'] / 2**20:.1f} MiB, disk->host {s['disk_to_host_bytes'] / 2**20:.1f} MiB, "
      f"stalled {s['stall_s']:.2f} s, {s['compiles']} compilations")
print("memory:", engine.memory_report())
'''),
    ("md", """
## Check: the same tokens as `transformers` (tiny model)

Exact mode fetches every expert a token is routed to, so a quarter of the
experts on the device must give the tokens of the full model. For the tiny
model the reference is `transformers`' own greedy `generate` (float32 on
both sides). For a real model this comparison would load the whole model in
PyTorch; the repository's parity tests cover every family instead.
"""),
    ("code", r'''
if not USE_HUB:
    import torch

    ids = tok.encode(PROMPTS[1])
    ours = engine.generate([ids], max_new_tokens=NEW_TOKENS, stop_at_eos=False).tokens[0]
    hf_model.generation_config.eos_token_id = None  # compare all NEW_TOKENS tokens, EOS or not
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=2)[0, len(ids):].tolist()
    print("emoe_jax     :", ours)
    print("transformers :", ref)
    assert ours == ref, "the offloaded engine and transformers disagree"
    print(f"identical, with {slots} of {cfg.num_experts} experts per layer on the device")
else:
    print("real model: see tests/test_parity.py for parity with transformers")
'''),
    ("md", """
## From a shell

```bash
python -m emoe_jax.convert ~/hf/OLMoE-1B-7B-0924 out/olmoe --dtype bfloat16
python -m emoe_jax.generate --model out/olmoe --prompt "The capital of France is" --device-experts 0.1
```
"""),
]
