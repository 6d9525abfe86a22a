"""Model configuration: one frozen `MoEConfig` for every supported family.

Steps of `from_hf_config`:
  1. pick the family from `model_type` (or `architectures`);
  2. check every field of the Hugging Face `config.json` against the family's
     list of understood fields, refusing unknown ones (naming them) and known
     ones whose value we do not implement (Qwen's sliding windows, other activations,
     quantization methods the converter cannot dequantize...);
  3. map the fields onto `MoEConfig`, accepting both old and new spellings
     (`num_experts` / `num_local_experts` / `n_routed_experts`); rope settings are read
     as transformers reads them (`_rope_from_hf`), refusing keys we do not implement.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from emoe_jax.errors import EmoeError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")

# Router variants (see model/router.py): how scores are made and how top-k is chosen.
SCORING_FUNCS = ("softmax", "sigmoid")
# greedy: top-k over all experts; group_limited_greedy (DeepSeek-V2): keep the topk_group groups with the
# highest max score; noaux_tc (DeepSeek-V3, GLM-4.5): same with group score = sum of the top-2 scores.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class ConfigError(EmoeError):
    """A configuration we cannot run faithfully; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding settings. `kind` is 'default' or 'yarn' (DeepSeek-V2, gpt-oss)."""

    theta: float = 10000.0
    kind: str = "default"
    # YaRN fields (used only when kind == 'yarn'); names follow transformers.
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # YaRN's cos/sin scale; None: derived from factor (and mscale / mscale_all_dim when both are
    # nonzero; mscale 0 = absent from config.json) as transformers does.
    attention_factor: float | None = None
    # YaRN: round the correction range to whole dimensions (transformers' default); gpt-oss sets False.
    truncate: bool = True
    # DeepSeek rotates interleaved pairs (x0,x1),(x2,x3)...; the others rotate halves.
    interleaved: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A decoder-only MoE transformer. Fields not used by a family keep their defaults."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Dense FFN width (dense layers of DeepSeek / Qwen `mlp_only_layers`).
    intermediate_size: int
    # Routed experts.
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # Router: score function, top-k method with its expert groups, and DeepSeek-V3's
    # `e_score_correction_bias` (added to the scores for choosing experts, not to the weights).
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    score_correction_bias: bool = False
    # Layers that use a dense FFN instead of an MoE block.
    dense_layers: tuple[int, ...] = ()
    # Shared experts: Qwen2-MoE has one sigmoid-gated shared expert; DeepSeek has plain ones.
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = False
    # Attention.
    attention: str = "gqa"  # 'gqa' or 'mla'
    qkv_bias: bool = False
    # 'none', 'head' (Qwen3: RMSNorm over head_dim), 'full' (OLMoE: RMSNorm over all heads).
    qk_norm: str = "none"
    clip_qkv: float | None = None
    # GLM-4.5 rotates only the first head_dim * partial_rotary_factor dims of each head.
    partial_rotary_factor: float = 1.0
    o_proj_bias: bool = False  # gpt-oss: biased output projection
    # gpt-oss: one learned logit per head that joins every softmax ("attention sink") and is dropped.
    attention_sinks: bool = False
    # Sliding-window attention: a query sees the `sliding_window` latest keys (itself included), in
    # the layers listed (Mixtral: all; gpt-oss: every other one). None: full attention everywhere.
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    # Routed experts. 'swiglu': silu(g) * u; 'clamped_swiglu' (gpt-oss): g clamped above at
    # `swiglu_limit`, u clamped to +-limit, out = (u + 1) * g * sigmoid(alpha * g).
    expert_act: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # gpt-oss: biases in the router and in each expert's gate/up/down projections.
    router_bias: bool = False
    expert_bias: bool = False
    # MLA (DeepSeek-V2).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Tokenizer behaviour: whether the family's tokenizer prepends BOS.
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"attention={self.attention!r} must be 'gqa' or 'mla'")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"qk_norm={self.qk_norm!r} must be 'none', 'head' or 'full'")
        bad = [layer for layer in self.dense_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise ConfigError(f"dense_layers {bad} outside [0, {self.num_layers})")
        bad = [layer for layer in self.sliding_window_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise ConfigError(f"sliding_window_layers {bad} outside [0, {self.num_layers})")
        if self.sliding_window_layers and not (self.sliding_window and self.sliding_window > 0):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive int when "
                              "sliding_window_layers is set")
        if self.expert_act not in ("swiglu", "clamped_swiglu"):
            raise ConfigError(f"expert_act={self.expert_act!r} must be 'swiglu' or 'clamped_swiglu'")
        self._check_router()
        rd = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rd != int(rd) or int(rd) % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} must give an even number "
                              f"of rotary dims in (0, head_dim={self.head_dim}]")

    def _check_router(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func={self.scoring_func!r} must be one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method={self.topk_method!r} must be one of {', '.join(TOPK_METHODS)}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ConfigError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.topk_method == "greedy" and self.n_group != 1:
            raise ConfigError("n_group > 1 needs topk_method 'group_limited_greedy' or 'noaux_tc'")
        per_group = self.num_experts // self.n_group
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise ConfigError(f"noaux_tc scores each group by its top-2 experts; groups of {per_group} are too small")
        if self.top_k > self.topk_group * per_group:
            raise ConfigError(f"top_k={self.top_k} exceeds the experts of the topk_group={self.topk_group} "
                              f"groups kept ({self.topk_group * per_group})")

    # ---- derived quantities -------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder-layer indices that hold routed experts, in order."""
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections, and their biases)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        return 3 * h * i + ((2 * i + h) if self.expert_bias else 0)

    def window_of(self, layer: int) -> int | None:
        """Sliding-window length of decoder layer `layer`, or None for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (GQA); the rest pass through unrotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MoEConfig fields: {', '.join(unknown)}")
        d["rope"] = RopeConfig(**d.get("rope", {}))
        for key in ("dense_layers", "sliding_window_layers"):
            d[key] = tuple(d.get(key, ()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


# ---------------------------------------------------------------------------
# Presets: real shapes of the public checkpoints, and tiny shapes for tests.
# ---------------------------------------------------------------------------

PRESETS: dict[str, MoEConfig] = {
    "mixtral-8x7b": MoEConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, num_experts=8, top_k=2,
        moe_intermediate_size=14336, norm_topk_prob=True, rope=RopeConfig(theta=1e6),
        rms_norm_eps=1e-5, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
        add_bos=True,
    ),
    "qwen1.5-moe-a2.7b": MoEConfig(
        family="qwen2_moe", vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16,
        num_kv_heads=16, head_dim=128, intermediate_size=5632, num_experts=60, top_k=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        shared_expert_gated=True, qkv_bias=True, rope=RopeConfig(theta=1e6),
        max_position_embeddings=8192, eos_token_id=151643,
    ),
    "qwen3-30b-a3b": MoEConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, intermediate_size=6144, num_experts=128, top_k=8,
        moe_intermediate_size=768, norm_topk_prob=True, qk_norm="head",
        rope=RopeConfig(theta=1e6), max_position_embeddings=40960, eos_token_id=151645,
    ),
    "olmoe-1b-7b": MoEConfig(
        family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16,
        num_kv_heads=16, head_dim=128, intermediate_size=1024, num_experts=64, top_k=8,
        moe_intermediate_size=1024, qk_norm="full", rms_norm_eps=1e-5,
        max_position_embeddings=4096, eos_token_id=50279, pad_token_id=1,
    ),
    "deepseek-v2-lite": MoEConfig(
        family="deepseek_v2", vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16,
        num_kv_heads=16, head_dim=64, intermediate_size=10944, num_experts=64, top_k=6,
        moe_intermediate_size=1408, dense_layers=(0,), shared_expert_intermediate_size=2 * 1408,
        attention="mla", kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                        interleaved=True),
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001, add_bos=True,
    ),
    # DeepSeek-V3 / R1 (same shape): 58 MoE layers x 256 experts, top-8 within 4 of 8 groups.
    "deepseek-v3": MoEConfig(
        family="deepseek_v3", vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128,
        num_kv_heads=128, head_dim=64, intermediate_size=18432, num_experts=256, top_k=8,
        moe_intermediate_size=2048, norm_topk_prob=True, routed_scaling_factor=2.5,
        scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, score_correction_bias=True,
        dense_layers=(0, 1, 2), shared_expert_intermediate_size=2048, attention="mla",
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, interleaved=True),
        max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, add_bos=True,
    ),
    # GLM-4.5: 89 MoE layers x 160 experts, top-8, half-rotary GQA with qkv bias and QK norm.
    "glm-4.5": MoEConfig(
        family="glm4_moe", vocab_size=151552, hidden_size=5120, num_layers=92, num_heads=96,
        num_kv_heads=8, head_dim=128, intermediate_size=12288, num_experts=160, top_k=8,
        moe_intermediate_size=1536, norm_topk_prob=True, routed_scaling_factor=2.5,
        scoring_func="sigmoid", topk_method="noaux_tc", score_correction_bias=True, dense_layers=(0, 1, 2),
        shared_expert_intermediate_size=1536, qkv_bias=True, qk_norm="head", partial_rotary_factor=0.5,
        rope=RopeConfig(theta=1e6), rms_norm_eps=1e-5, max_position_embeddings=131072,
        pad_token_id=151329, eos_token_id=(151329, 151336, 151338),
    ),
    # GLM-4.5-Air: 45 MoE layers x 128 experts, top-8, no QK norm.
    "glm-4.5-air": MoEConfig(
        family="glm4_moe", vocab_size=151552, hidden_size=4096, num_layers=46, num_heads=96,
        num_kv_heads=8, head_dim=128, intermediate_size=10944, num_experts=128, top_k=8,
        moe_intermediate_size=1408, norm_topk_prob=True, routed_scaling_factor=1.0,
        scoring_func="sigmoid", topk_method="noaux_tc", score_correction_bias=True, dense_layers=(0,),
        shared_expert_intermediate_size=1408, qkv_bias=True, partial_rotary_factor=0.5,
        rope=RopeConfig(theta=1e6), rms_norm_eps=1e-5, max_position_embeddings=131072,
        pad_token_id=151329, eos_token_id=(151329, 151336, 151338),
    ),
    # gpt-oss-120b (openai/gpt-oss-120b config.json); gpt-oss-20b is the same with 24 layers, 32 experts.
    "gpt-oss-120b": MoEConfig(
        family="gpt_oss", vocab_size=201088, hidden_size=2880, num_layers=36, num_heads=64,
        num_kv_heads=8, head_dim=64, intermediate_size=2880, num_experts=128, top_k=4,
        moe_intermediate_size=2880, norm_topk_prob=True, qkv_bias=True, o_proj_bias=True,
        attention_sinks=True, sliding_window=128, sliding_window_layers=tuple(range(0, 36, 2)),
        expert_act="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0, router_bias=True,
        expert_bias=True,
        rope=RopeConfig(theta=150000.0, kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, truncate=False),
        rms_norm_eps=1e-5, max_position_embeddings=131072, eos_token_id=200002, pad_token_id=199999,
    ),
}
# Kimi-K2: the DeepSeek-V3 architecture with 384 experts in one group, 64 heads, one dense layer.
PRESETS["kimi-k2"] = PRESETS["deepseek-v3"].replace(
    vocab_size=163840, num_heads=64, num_kv_heads=64, num_experts=384, routed_scaling_factor=2.827, n_group=1,
    topk_group=1, dense_layers=(0,),
    rope=RopeConfig(theta=50000.0, kind="yarn", factor=32.0, original_max_position_embeddings=4096,
                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, interleaved=True),
    max_position_embeddings=131072, bos_token_id=163584, eos_token_id=163585,
)
# gpt-oss-20b: the 120b architecture with 24 layers and 32 experts.
PRESETS["gpt-oss-20b"] = PRESETS["gpt-oss-120b"].replace(num_layers=24, num_experts=32,
                                                         sliding_window_layers=tuple(range(0, 24, 2)))


def tiny_config(family: str, **overrides: Any) -> MoEConfig:
    """A tiny config of `family` for tests (float32-friendly sizes)."""
    base: dict[str, Any] = dict(
        family=family, vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=48, num_experts=8, top_k=2, moe_intermediate_size=16,
        max_position_embeddings=256,
    )
    if family == "mixtral":
        base.update(norm_topk_prob=True)
    elif family == "qwen2_moe":
        base.update(shared_expert_intermediate_size=24, shared_expert_gated=True, qkv_bias=True)
    elif family == "qwen3_moe":
        base.update(qk_norm="head", norm_topk_prob=True)
    elif family == "olmoe":
        base.update(qk_norm="full")
    elif family == "deepseek_v2":
        base.update(
            attention="mla", dense_layers=(0,), kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, head_dim=8, num_kv_heads=4,
            shared_expert_intermediate_size=32, rope=RopeConfig(interleaved=True),
        )
    elif family == "deepseek_v3":
        base.update(
            attention="mla", dense_layers=(0,), kv_lora_rank=16, qk_nope_head_dim=8, q_lora_rank=24,
            qk_rope_head_dim=8, v_head_dim=8, head_dim=8, num_kv_heads=4, norm_topk_prob=True,
            shared_expert_intermediate_size=16, rope=RopeConfig(interleaved=True), scoring_func="sigmoid",
            topk_method="noaux_tc", n_group=4, topk_group=2, score_correction_bias=True, routed_scaling_factor=2.5,
        )
    elif family == "glm4_moe":
        base.update(
            dense_layers=(0,), qkv_bias=True, qk_norm="head", partial_rotary_factor=0.5, norm_topk_prob=True,
            shared_expert_intermediate_size=16, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
            topk_group=1, score_correction_bias=True, routed_scaling_factor=1.5,
        )
    elif family == "gpt_oss":
        base.update(
            norm_topk_prob=True, qkv_bias=True, o_proj_bias=True, attention_sinks=True, sliding_window=4,
            sliding_window_layers=(0, 2), expert_act="clamped_swiglu", router_bias=True, expert_bias=True,
            rope=RopeConfig(theta=150000.0, kind="yarn", factor=32.0, original_max_position_embeddings=16,
                            truncate=False),
        )
    base.update(overrides)
    return MoEConfig(**base)


def get_preset(name: str) -> MoEConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------------------
# Hugging Face config.json reader
# ---------------------------------------------------------------------------

# Fields that never change the forward pass (training, bookkeeping, generation defaults).
_IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "attention_dropout", "_name_or_path", "model_type", "auto_map", "aux_loss_alpha",
    "seq_aux", "ep_size", "pretraining_tp", "quantization_config_ignored", "return_dict",
    "output_attentions", "output_hidden_states", "tie_word_embeddings", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tokenizer_class",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "vocab_size",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "hidden_act",
    "intermediate_size", "num_experts_per_tok", "head_dim", "max_window_layers",
    "layer_types", "use_sliding_window", "sliding_window", "norm_topk_prob",
    "generation_config", "use_return_dict", "moe_intermediate_size", "mlp_bias",
    "attention_bias", "quantization_config",
}

_DEEPSEEK_MLA_FIELDS = {"n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq",
                        "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                        "qk_head_dim", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
                        "scoring_func", "num_experts"}
# The multi-token-prediction layers some checkpoints carry after num_hidden_layers: the converter skips them.
_MTP_FIELDS = {"num_nextn_predict_layers", "num_mtp_layers"}

_FAMILY_FIELDS: dict[str, set[str]] = {
    "mixtral": {"num_local_experts"},
    "qwen2_moe": {"num_experts", "decoder_sparse_step", "mlp_only_layers",
                  "shared_expert_intermediate_size", "qkv_bias"},
    # qkv_bias / shared_expert_intermediate_size / use_qk_norm: Qwen3-Coder-480B carries them with values
    # that change nothing (checked in _check_fields).
    "qwen3_moe": {"num_experts", "num_local_experts", "decoder_sparse_step", "mlp_only_layers",
                  "qkv_bias", "shared_expert_intermediate_size", "use_qk_norm"},
    "olmoe": {"num_experts", "clip_qkv"},
    "deepseek_v2": _DEEPSEEK_MLA_FIELDS,
    "deepseek_v3": _DEEPSEEK_MLA_FIELDS | _MTP_FIELDS | {"num_local_experts", "rope_interleave"},
    "glm4_moe": {"n_routed_experts", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
                 "routed_scaling_factor", "partial_rotary_factor", "use_qk_norm", "num_local_experts"}
    | _MTP_FIELDS,
    "gpt_oss": {"num_local_experts", "num_experts", "swiglu_alpha", "swiglu_limit", "experts_per_token",
                "initial_context_length", "quantization_config"},
}

# Quantized checkpoints the converter dequantizes while streaming, per family (default:
# SUPPORTED_QUANTIZATION below).
_QUANT_METHODS = {"gpt_oss": ("mxfp4",)}

_ARCH_TO_FAMILY = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    # Kimi-K2 ships model_type 'kimi_k2' with the DeepSeek-V3 architecture.
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
}

# transformers' config defaults where they matter and differ from our generic fallbacks.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(n_shared_experts=1, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        first_k_dense_replace=3, norm_topk_prob=True, q_lora_rank=1536),
    "glm4_moe": dict(n_shared_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                     first_k_dense_replace=1, norm_topk_prob=True),
}

# Weight quantizations the converter dequantizes while streaming (checkpoint/dequant_fp8.py).
SUPPORTED_QUANTIZATION = ("fp8",)


def _family_of(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in hf.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    raise ConfigError(
        f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
        f"emoe_jax supports: {', '.join(FAMILIES)}"
    )


# transformers' `default_theta` of each family's config class (used when config.json names no theta).
_DEFAULT_THETA = {"mixtral": 1e6, "gpt_oss": 150000.0}

# Rope sub-keys we implement, per rope type (what transformers' rope init functions read).
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "yarn": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "attention_factor",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings",
             "truncate"},
}


def _rope_from_hf(hf: Mapping[str, Any], family: str) -> RopeConfig:
    """RopeConfig as transformers builds it from config.json.

    Steps (transformers' `convert_rope_params_to_dict` / `standardize_rope_params` and the rope
    init functions of modeling_rope_utils):
      1. the effective dict is `rope_scaling` when set (it *replaces* `rope_parameters`), else
         `rope_parameters`; per-layer-type dicts are refused;
      2. theta: the dict's `rope_theta`, else the top-level `rope_theta`, else the family default;
      3. every sub-key must be one we implement for its rope type (others are refused by name);
      4. YaRN: `factor` (None: max_position_embeddings / original), `attention_factor` (None:
         derived from factor, mscale, mscale_all_dim), `beta_fast`/`beta_slow` (falsy: 32 / 1),
         `truncate` (default True).
    """
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    eff = hf.get(where) or {}
    if not isinstance(eff, Mapping):
        raise ConfigError(f"config field {where}={eff!r} must be a dict")
    eff = dict(eff)
    nested = [k for k, v in eff.items() if isinstance(v, Mapping)]
    if nested:
        raise ConfigError(f"{where} has per-layer-type rope settings ({', '.join(nested)}); "
                          "emoe_jax implements one rope for all layers")
    theta = float(eff.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_THETA.get(family, 10000.0))
    kind = eff.get("rope_type", eff.get("type", "default")) or "default"
    if kind not in _ROPE_KEYS:
        raise ConfigError(
            f"rope type {kind!r} is not supported (field {where}); supported: {', '.join(_ROPE_KEYS)}"
        )
    unknown = sorted(k for k in eff if k not in _ROPE_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"{where} key(s) {', '.join(unknown)} are not implemented for rope type {kind!r} "
            f"(implemented: {', '.join(sorted(_ROPE_KEYS[kind]))}); this checkpoint cannot be run faithfully"
        )
    # GLM-4.5 rotates part of each head (read in from_hf_config); elsewhere only full-width rotary.
    if family != "glm4_moe" and eff.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ConfigError(f"{where}.partial_rotary_factor={eff['partial_rotary_factor']!r} is not "
                          f"implemented for {family} (only full-width rotary)")
    interleaved = family == "deepseek_v2" or (family == "deepseek_v3" and bool(hf.get("rope_interleave", True)))
    if kind == "default":
        return RopeConfig(theta=theta, interleaved=interleaved)
    if "factor" not in eff:
        raise ConfigError(f"{where} of rope type 'yarn' lacks 'factor'")
    original = eff.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if not original:
        raise ConfigError(f"{where} of rope type 'yarn' lacks original_max_position_embeddings")
    factor = eff["factor"]
    if factor is None:
        factor = float(hf.get("max_position_embeddings", 0)) / float(original)
    factor = float(factor)
    mscale, mscale_all_dim = eff.get("mscale"), eff.get("mscale_all_dim")
    # transformers derives the attention factor from mscale / mscale_all_dim only when both are set;
    # mscale=0 records "absent" where it would otherwise be read (see `layers.rope_inv_freq`).
    mscale = float(mscale or (0.0 if mscale_all_dim else 1.0))
    attention_factor = eff.get("attention_factor")
    return RopeConfig(
        theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=int(original),
        beta_fast=float(eff.get("beta_fast") or 32.0), beta_slow=float(eff.get("beta_slow") or 1.0),
        mscale=mscale, mscale_all_dim=float(mscale_all_dim or 0.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(eff.get("truncate", True)),
        interleaved=interleaved,
    )


def quant_method(hf: Mapping[str, Any]) -> str | None:
    """The checkpoint's `quantization_config.quant_method` (None: not quantized)."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, Mapping) else None
    return str(method) if method is not None else "unknown (quantization_config without quant_method)"


def _check_quantization(hf: Mapping[str, Any], family: str) -> None:
    """Weight quantization is accepted only where the converter dequantizes it exactly: MXFP4 for
    gpt-oss (checkpoint/dequant_mxfp4.py), block-scaled FP8 elsewhere (checkpoint/dequant_fp8.py)."""
    method = quant_method(hf)
    if method is None:
        return
    supported = _QUANT_METHODS.get(family, SUPPORTED_QUANTIZATION)
    if method not in supported:
        raise ConfigError(
            f"quantization_config.quant_method={method!r} is not supported for {family} checkpoints "
            f"(supported: {', '.join(supported)}); the converter would have to dequantize it and does not "
            "know how: convert an unquantized (bf16) release instead"
        )
    qc = hf["quantization_config"]
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"quantization_config.fmt={fmt!r} is not supported: FP8 weights must be e4m3")
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
            raise ConfigError(f"quantization_config.weight_block_size={block!r} is not supported: "
                              "need [rows, cols] blocks (DeepSeek-V3: [128, 128])")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"quantization_config.activation_scheme={qc.get('activation_scheme')!r} is not "
                              "supported: only 'dynamic' (no stored activation scales)")


def _sliding_layers(hf: Mapping[str, Any], family: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, layers that use it) as transformers' attention masks apply them."""
    window = hf.get("sliding_window")
    layers = int(hf.get("num_hidden_layers") or 0)
    if family == "mixtral":  # every layer slides when sliding_window is set
        return (int(window), tuple(range(layers))) if window else (None, ())
    if family != "gpt_oss":
        return None, ()
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(layers)]
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if bad or len(types) != layers:
        raise ConfigError(f"config field layer_types has {'types ' + ', '.join(bad) if bad else len(types)} "
                          f"entries; emoe_jax implements {layers} entries of sliding_attention / full_attention")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if sliding and not window:
        raise ConfigError(f"config field sliding_window={window!r} but layer_types has sliding_attention "
                          "layers; set the window length")
    return (int(window), sliding) if sliding else (None, ())


def _check_fields(hf: Mapping[str, Any], family: str) -> None:
    allowed = _IGNORED | _FAMILY_FIELDS[family]
    unknown = sorted(k for k in hf if k not in allowed and k != "quantization_config")
    if unknown:
        raise ConfigError(
            f"config.json of a {family} model has fields emoe_jax does not support: "
            f"{', '.join(unknown)}. Remove them only if they do not change the forward pass; "
            "otherwise this checkpoint cannot be run faithfully."
        )

    def refuse(field: str, why: str) -> None:
        raise ConfigError(f"config field {field}={hf.get(field)!r} is not supported: {why}")

    _check_quantization(hf, family)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        refuse("hidden_act", "only SwiGLU (silu) experts are implemented")
    if family not in ("mixtral", "gpt_oss") and hf.get("use_sliding_window"):
        refuse("use_sliding_window", f"sliding-window attention of {family} (max_window_layers) is not implemented")
    if family == "gpt_oss":
        per_token = hf.get("experts_per_token")
        if per_token is not None and per_token != hf.get("num_experts_per_tok", per_token):
            refuse("experts_per_token", f"differs from num_experts_per_tok={hf.get('num_experts_per_tok')}")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "biased MLPs are not implemented")
    if family == "deepseek_v2":
        if hf.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
            refuse("topk_method", "DeepSeek-V2 routes with 'greedy' or 'group_limited_greedy'")
        if hf.get("scoring_func", "softmax") != "softmax":
            refuse("scoring_func", "DeepSeek-V2 routes with softmax scores")
        if hf.get("norm_topk_prob"):
            refuse("norm_topk_prob", "transformers' DeepSeek-V2 does not renormalise top-k weights")
    if family == "deepseek_v3":
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            refuse("topk_method", "DeepSeek-V3 routes with 'noaux_tc' (sigmoid scores, correction bias, groups)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            refuse("scoring_func", "DeepSeek-V3 routes with sigmoid scores")
    if family in ("deepseek_v2", "deepseek_v3") and hf.get("moe_layer_freq", 1) != 1:
        refuse("moe_layer_freq", "only every-layer MoE after first_k_dense_replace is implemented")
    if family == "qwen3_moe":
        # Accepted only with the values that change nothing: transformers' Qwen3-MoE has no qkv bias
        # (biases come from attention_bias), no shared expert, and always normalises q and k.
        if hf.get("qkv_bias", False):
            refuse("qkv_bias", "Qwen3-MoE has no q/k/v bias switch (set attention_bias for biases); "
                               "a checkpoint with this set cannot be run faithfully")
        if hf.get("shared_expert_intermediate_size") or 0:
            refuse("shared_expert_intermediate_size", "Qwen3-MoE has no shared expert")
        if not hf.get("use_qk_norm", True):
            refuse("use_qk_norm", "Qwen3-MoE always applies RMSNorm to q and k")
    if family in ("qwen2_moe", "qwen3_moe") and hf.get("decoder_sparse_step", 1) < 1:
        refuse("decoder_sparse_step", "must be >= 1")


def _deepseek_fields(hf: Mapping[str, Any], need: Callable[..., Any], *, num_experts: int,
                     dense: int) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 share: MLA attention, shared experts n x the expert width, leading
    dense layers, and a BOS added by the tokenizer."""
    moe_inter = int(need("moe_intermediate_size"))
    q_lora = hf.get("q_lora_rank")
    rope_dim = int(need("qk_rope_head_dim"))
    return dict(
        num_experts=num_experts, moe_intermediate_size=moe_inter, dense_layers=tuple(range(dense)),
        shared_expert_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
        attention="mla", qkv_bias=bool(hf.get("attention_bias", False)),
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")), qk_rope_head_dim=rope_dim,
        v_head_dim=int(need("v_head_dim")), head_dim=rope_dim, add_bos=True,
    )


def from_hf_config(hf: Mapping[str, Any] | str | Path) -> MoEConfig:
    """Map a Hugging Face config (dict, or path to config.json or its directory) to MoEConfig."""
    if not isinstance(hf, Mapping):
        path = Path(hf)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    family = _family_of(hf)
    _check_fields(hf, family)
    # Absent fields take transformers' defaults for the family (they differ from the other families').
    hf = {**_HF_DEFAULTS.get(family, {}), **hf}

    def need(*names: str) -> Any:
        for name in names:
            if hf.get(name) is not None:
                return hf[name]
        raise ConfigError(f"config.json lacks {' / '.join(names)} (needed for {family})")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    layers = int(need("num_hidden_layers"))
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(need("intermediate_size")),
        top_k=int(need("num_experts_per_tok", "experts_per_token")),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
        else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        rope=_rope_from_hf(hf, family),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )
    kw["sliding_window"], kw["sliding_window_layers"] = _sliding_layers(hf, family)
    if family == "mixtral":
        kw.update(num_experts=int(need("num_local_experts", "num_experts")),
                  moe_intermediate_size=kw["intermediate_size"], norm_topk_prob=True, add_bos=True)
    elif family in ("qwen2_moe", "qwen3_moe"):
        step = int(hf.get("decoder_sparse_step", 1))
        mlp_only = set(hf.get("mlp_only_layers") or [])
        kw.update(
            num_experts=int(need("num_experts", "num_local_experts")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            dense_layers=tuple(i for i in range(layers) if i in mlp_only or (i + 1) % step != 0),
        )
        if family == "qwen2_moe":
            kw.update(qkv_bias=bool(hf.get("qkv_bias", True)),
                      shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
                      shared_expert_gated=bool(hf.get("shared_expert_intermediate_size")))
        else:
            kw.update(qk_norm="head", qkv_bias=bool(hf.get("attention_bias", False)))
    elif family == "olmoe":
        kw.update(num_experts=int(need("num_experts")), moe_intermediate_size=kw["intermediate_size"],
                  qk_norm="full", qkv_bias=bool(hf.get("attention_bias", False)),
                  clip_qkv=hf.get("clip_qkv"))
    elif family == "deepseek_v2":
        kw.update(_deepseek_fields(hf, need, num_experts=int(need("n_routed_experts", "num_experts")),
                                   dense=int(hf.get("first_k_dense_replace", 0))),
                  routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
        if hf.get("topk_method") == "group_limited_greedy":
            kw.update(topk_method="group_limited_greedy", n_group=int(need("n_group")),
                      topk_group=int(need("topk_group")))
    elif family == "deepseek_v3":
        kw.update(_deepseek_fields(hf, need,
                                   num_experts=int(need("n_routed_experts", "num_local_experts", "num_experts")),
                                   dense=min(int(hf.get("first_k_dense_replace") or 0), layers)),
                  **_sigmoid_router_fields(hf))
    elif family == "glm4_moe":
        moe_inter = int(need("moe_intermediate_size"))
        params = hf.get("rope_parameters") or {}
        # transformers 5 keeps it in rope_parameters; older configs at the top level; GLM's default is 0.5.
        prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        kw.update(
            num_experts=int(need("n_routed_experts", "num_local_experts")),
            moe_intermediate_size=moe_inter,
            dense_layers=tuple(range(min(int(hf.get("first_k_dense_replace") or 0), layers))),
            shared_expert_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
            qkv_bias=bool(hf.get("attention_bias", False)),
            qk_norm="head" if hf.get("use_qk_norm") else "none",
            partial_rotary_factor=float(prf),
            **_sigmoid_router_fields(hf),
        )
    elif family == "gpt_oss":
        bias = bool(hf.get("attention_bias", True))
        kw.update(
            num_experts=int(need("num_local_experts", "num_experts")),
            top_k=int(need("num_experts_per_tok", "experts_per_token")),
            moe_intermediate_size=kw["intermediate_size"],
            # softmax over the top-k router logits = softmax, top-k, renormalise
            norm_topk_prob=True, qkv_bias=bias, o_proj_bias=bias, attention_sinks=True,
            expert_act="clamped_swiglu", swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)), router_bias=True, expert_bias=True,
        )
    return MoEConfig(**kw)


def _sigmoid_router_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 router: sigmoid scores, correction bias, noaux_tc group selection."""
    return dict(
        scoring_func="sigmoid", topk_method="noaux_tc", score_correction_bias=True,
        n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )
