"""Training presets: the shapes of models we train ourselves.

`embedded` is the default model shipped in `checkpoints/embedded/`: a Qwen3-MoE
style decoder (GQA with per-head QK-norm, renormalised top-k) small enough that
its routed experts in bfloat16 stay under 32 MB, trained on the 7-task corpus
with the corpus' 4096-token BPE (<bos>=0, <eos>=1, <pad>=2).
"""

from __future__ import annotations

from emoe_jax.config import ConfigError, MoEConfig, RopeConfig

TRAIN_PRESETS: dict[str, MoEConfig] = {
    # 8 layers x 32 experts x 3*160*96 = 11.8M routed params (23.6 MB bf16) + ~2.0M dense params.
    "embedded": MoEConfig(
        family="qwen3_moe", vocab_size=4096, hidden_size=160, num_layers=8, num_heads=4, num_kv_heads=2,
        head_dim=40, intermediate_size=384, num_experts=32, top_k=4, moe_intermediate_size=96,
        norm_topk_prob=True, qk_norm="head", rope=RopeConfig(theta=10000.0), rms_norm_eps=1e-6,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, add_bos=True,
    ),
}


def get_train_preset(name: str) -> MoEConfig:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown training preset {name!r}; available: {', '.join(sorted(TRAIN_PRESETS))}") from None
