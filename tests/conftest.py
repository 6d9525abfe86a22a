"""Suite-wide test setup."""

import atexit
import os
import shutil
import tempfile
from typing import NamedTuple

# One persistent compilation cache for the whole run, fresh each run (nothing carries over
# between runs): test modules, notebook kernels and CLI subprocesses compile many identical
# programs (the same tiny models, the embedded model's decode steps), and after the first
# compile each later one loads from disk. Set before jax is imported so subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="emoe_jax_test_xla_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet  # noqa: E402

# Property tests draw the same examples on every run (the suite must be deterministic); a new
# failure shows up when the code changes, not at random in CI.
settings.register_profile("emoe_jax", derandomize=True, print_blob=True)
settings.load_profile("emoe_jax")

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Drop compiled executables after each test module. Every XLA:CPU executable keeps a few
    hundred memory mappings alive, and the suite compiles hundreds of one-jit decode steps (one per
    model, slot count and predictor); kept for the whole run they pass the kernel's mapping limit
    (vm.max_map_count, 65530) and the process dies in the compiler. Later modules that need the
    same program load it from the run's persistent cache instead of compiling it again."""
    yield
    jax.clear_caches()


# ---------------------------------------------------------------------------- shared fixtures
# Tests receive these by name; none imports a helper module.


_TINY_MODELS: dict = {}


class CliResult(NamedTuple):
    """What a command line returned, as subprocess.run would give it."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_main(capsys):
    """Factory: run_main(main, *args) -> CliResult of a command line's `main(argv)` run in this process.
    Far cheaper than a subprocess (no interpreter and JAX start-up, compiled programs shared); each CLI
    keeps one subprocess test of its `python -m` entry point. An exception escaping `main` fails the
    test, as a traceback on a subprocess's stderr would."""

    def run(main, *args) -> CliResult:
        capsys.readouterr()  # drop what the test printed before
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:  # CLIs point the compile cache at their own settings; keep the run's
            jax.config.update("jax_compilation_cache_dir", _CACHE)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        out, err = capsys.readouterr()
        return CliResult(rc, out, err)

    return run


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: tiny_model(family) -> (cfg, graphdef, params, experts, all-resident reference) of a
    tiny random model (2 layers; 3 for deepseek_v2, whose first layer is dense), built once per process."""
    from emoe_jax.config import tiny_config
    from emoe_jax.model.random_init import random_model
    from emoe_jax.model.resident import ResidentModel

    def build(family: str):
        if family not in _TINY_MODELS:
            cfg = tiny_config(family, num_layers=2 if family != "deepseek_v2" else 3)
            g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
            _TINY_MODELS[family] = (cfg, g, p, ex, ResidentModel(cfg, g, p, ex))
        return _TINY_MODELS[family]

    return build


def _make_traces(experts_per_prompt, num_experts, ids=None) -> TraceSet:
    """A TraceSet from a list of [T, L, k] expert arrays."""
    first = np.asarray(experts_per_prompt[0])
    L, k = first.shape[1], first.shape[2]
    meta = TraceMeta(model="test", num_layers=L, num_experts=num_experts, top_k=k,
                     moe_layer_ids=tuple(range(L)), hidden_size=None, source="test")  # fmt: skip
    ids = ids or list(range(len(experts_per_prompt)))
    prompts = [
        PromptTrace(prompt_id=pid, task="", text="", token_ids=np.arange(len(x), dtype=np.int32),
                    experts=np.asarray(x, np.int16), weights=None, n_prefill=len(x))  # fmt: skip
        for pid, x in zip(ids, experts_per_prompt)
    ]
    return TraceSet.from_prompts(meta, prompts)


# Reference prompts are left-padded to this many tokens (drawn prompts + new tokens fit) and the batch
# is filled with one-token rows to a multiple of REFERENCE_ROWS, so the all-resident model compiles
# its steps once per family instead of once per example (rows are independent: no capacity limits).
REFERENCE_LENGTH = 32
REFERENCE_ROWS = 4


@pytest.fixture(scope="session")
def assert_equals_resident():
    """assert_equals_resident(resident, prompts, out, new): the engine's greedy tokens equal the
    all-resident model's, and its logits equal the resident model's teacher-forced logits at the
    generated positions (atol 2e-5, rtol 1e-5)."""

    def check(resident, prompts, out, new: int) -> None:
        filler = [[3]] * (-len(prompts) % REFERENCE_ROWS)  # ignored rows that keep the batch size fixed
        ref_tokens = resident.generate(list(prompts) + filler, new, length=REFERENCE_LENGTH)
        fulls = [list(prompt) + list(out.tokens[i][:-1]) for i, prompt in enumerate(prompts)]
        logits, _, pad = resident.logits(fulls + filler, length=REFERENCE_LENGTH + new)
        for i, prompt in enumerate(prompts):
            assert out.tokens[i] == ref_tokens[i].tolist()
            start = int(pad[i]) + len(prompt) - 1  # row i's last prompt token
            np.testing.assert_allclose(out.logits[i], np.asarray(logits[i, start:]), atol=2e-5, rtol=1e-5)

    return check


@pytest.fixture(scope="session")
def make_traces():
    """Factory: make_traces(experts_per_prompt, num_experts, ids=None) -> a TraceSet of [T, L, k] arrays."""
    return _make_traces


# Families whose router scores are sigmoids (saturate if widened too much) and carry a correction bias.
SIGMOID_ROUTED = ("deepseek_v3", "glm4_moe")

# gpt-oss's structure at tiny size: sinks, sliding (window 4) / full alternation, biases everywhere,
# clamped SwiGLU, the real YaRN settings (truncate=False matters at head_dim 8 with these values).
GPT_OSS_TINY = dict(num_local_experts=8, num_experts_per_tok=4, intermediate_size=16, head_dim=8,
                    num_hidden_layers=4, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 4096,
                                     "rope_theta": 150000.0})

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _make_hf_model(family: str, seed: int = 0, **overrides):
    """A float32 tiny random HF model of `family` with eager attention and experts."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(_COMMON)
    if family in ("mixtral", "mixtral_sliding"):
        cls, cfg_cls = tf.MixtralForCausalLM, tf.MixtralConfig
        kw.update(num_local_experts=8, num_experts_per_tok=2)
        if family == "mixtral_sliding":
            kw.update(sliding_window=4)
    elif family == "gpt_oss":
        cls, cfg_cls = tf.GptOssForCausalLM, tf.GptOssConfig
        kw.update(GPT_OSS_TINY)
    elif family == "qwen2_moe":
        cls, cfg_cls = tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, norm_topk_prob=False)
    elif family == "qwen3_moe":
        cls, cfg_cls = tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                  norm_topk_prob=True)
    elif family == "olmoe":
        cls, cfg_cls = tf.OlmoeForCausalLM, tf.OlmoeConfig
        kw.update(num_experts=8, num_experts_per_tok=2, intermediate_size=16)
    elif family == "deepseek_v2":
        cls, cfg_cls = tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config
        kw.update(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                  kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                  v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4,
                  routed_scaling_factor=1.0)
    elif family == "deepseek_v3":
        # The real config's structure at tiny size: q LoRA, interleaved YaRN rope, a leading dense layer,
        # 4 groups of 4 experts with the best 2 groups kept, correction bias, shared expert.
        cls, cfg_cls = tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config
        kw.update(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, n_shared_experts=1,
                  kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  first_k_dense_replace=1, n_group=4, topk_group=2, num_key_value_heads=4,
                  routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                  # YaRN as released (factor 40 over 4096, mscale_all_dim 1), scaled to the tiny context.
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0,
                                   "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "mscale": 1.0, "mscale_all_dim": 1.0})
    elif family == "glm4_moe":
        # GLM-4.5's structure: GQA with qkv bias, half-rotary heads, QK norm, a leading dense layer,
        # grouped sigmoid router with correction bias, shared expert.
        cls, cfg_cls = tf.Glm4MoeForCausalLM, tf.Glm4MoeConfig
        kw.update(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16, attention_bias=True,
                  use_qk_norm=True, partial_rotary_factor=0.5, routed_scaling_factor=1.5, norm_topk_prob=True)
    else:
        raise ValueError(family)
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    try:
        model = cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    except TypeError:
        model = cls._from_config(cfg, attn_implementation="eager")
    model.eval()
    # Random init of transformers uses std 0.02, which makes routers nearly uniform;
    # widen router weights so top-k choices are well separated (ties would make
    # the comparison depend on tie-breaking, not on the implementation).
    # Sigmoid routers saturate (ties at 1.0) if widened as much; their correction bias (zero at init)
    # gets random values large enough to change some choices.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] in (8, 16):
                p.mul_(5.0 if family in SIGMOID_ROUTED else 20.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
        if family == "gpt_oss":  # transformers inits biases to 0 and weights at std 0.02: make each matter
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    p.copy_(torch.randn_like(p))
                elif name.endswith(("router.bias", "sinks", "_proj.bias", "proj_bias")):
                    p.copy_(0.5 * torch.randn_like(p))
                elif name.endswith("experts.gate_up_proj"):  # large enough that the clamp at 7 acts
                    p.copy_(torch.randn_like(p))
                elif name.endswith("experts.down_proj"):
                    p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def make_hf_model():
    """Factory: make_hf_model(family, seed=0, **overrides) -> a float32 tiny random transformers model
    of `family` (eager attention and experts; routers widened so top-k choices are well separated)."""
    return _make_hf_model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A converted tiny qwen3_moe checkpoint with a real (tiny) BPE tokenizer, for CLI tests."""
    from emoe_jax.checkpoint import write_checkpoint
    from emoe_jax.config import tiny_config
    from emoe_jax.data.synthetic import tiny_corpus, tiny_tokenizer
    from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf
    from emoe_jax.model.random_init import random_model

    root = tmp_path_factory.mktemp("gen")
    tok = tiny_tokenizer(tiny_corpus(root / "corpus", docs_per_task=10), root / "tok", vocab_size=300)
    cfg = tiny_config("qwen3_moe", vocab_size=300, bos_token_id=0, eos_token_id=1, pad_token_id=2, add_bos=True)
    _, params, experts = random_model(cfg, seed=3, router_scale=5.0)
    stacked = {w: np.stack([np.asarray(getattr(e, w)) for e in experts]) for w in ("gate", "up", "down")}
    write_checkpoint(root / "ckpt", cfg, nest_for_checkpoint(params_to_hf(cfg, params)), stacked,
                     tokenizer_dir=tok)
    return root / "ckpt"
