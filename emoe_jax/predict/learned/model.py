"""The learned routing predictor network (Flax NNX), strictly causal.

What it sees when it predicts at step s = (t, l) (token-major, before layer l
of token t routes): token ids up to t, the full routing of tokens < t, and the
routing of token t at layers < l. Never the router input or routing of layer l
itself (MoE-Beyond's flaw: that input already decides the answer), never a
future token.

Steps:
1. Token context (``context``): each token's input is a hashed-id embedding
   plus the summed embeddings of the previous token's (layer, expert) routing
   (multi-hot over L*E keys); a causal transformer with ALiBi position bias and
   a sliding window of ``window`` tokens turns it into h_t [d]. h_t thus depends
   on ids <= t and routing of tokens < t only.
2. Step features (``step_features``): z(t, l) = h_t + layer_embed[l]
   + sum over layers j < l of token t's routing embeddings (a prefix sum)
   + a separate embedding of token t's routing at layer l-1 (the strongest cue)
   + when traces store router inputs, a projection of token t's router input
   at layer l-1 (never layer l's: that input alone decides layer l's routing,
   which would turn the distance-0 target into MoE-Beyond's no-lookahead flaw).
3. Step head (``step_head``): residual MLP blocks, then one linear map to
   logits [horizon+1, E]: row d scores the experts of step s+d, i.e. layer
   (l+d) mod L of token t + (l+d) // L (the next token's early layers).

4. With ``cfg.table_prior`` (prior.py): the causal-table scores q [horizon+1, E]
   of the same step, computed from the same causal inputs, enter z through a
   linear map and the logits as ``+ a_d * logit(q)``; the output layer starts
   at zero, so an untrained network ranks exactly as the table does.

Training uses masked multi-label BCE over real (non-padding) steps only
(``train.py``); the predictor uses sigmoid(logits) as scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.prior import TablePrior, prior_logit, prior_scores

NEG_INF = -1e9


def token_buckets(token_ids: np.ndarray, buckets: int) -> np.ndarray:
    """Token ids -> embedding rows: id mod buckets; unknown ids (< 0) get row ``buckets``."""
    ids = np.asarray(token_ids, np.int64)
    return np.where(ids < 0, buckets, ids % buckets).astype(np.int32)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's geometric per-head slopes (Press et al.): 2^(-8 (i+1) / heads)."""
    return (2.0 ** (-8.0 * (np.arange(num_heads) + 1) / num_heads)).astype(np.float32)


def attention_mask(seg: jax.Array, pos: jax.Array, window: int) -> jax.Array:
    """[B, T, T] bool: query i may read key j (same segment, j not after i, within the window).

    seg [B, T] int32 (0 = padding), pos [B, T] int32 position inside its prompt.
    A padding query may read itself only, so softmax never sees an empty row.
    """
    dist = pos[:, :, None] - pos[:, None, :]  # [B, T, T] query pos - key pos
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = same & (dist >= 0) & (dist < window)
    eye = jnp.eye(seg.shape[1], dtype=bool)[None]
    return allowed | eye


def alibi_attention(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, mask: jax.Array,
                    dist: jax.Array) -> jax.Array:  # fmt: skip
    """Softmax attention with ALiBi: q [B, T, N, D], k/v [B, S, N, D], mask/dist [B, T, S] -> [B, T, N, D]
    (N heads of D dims, as in model/attention.py).

    Shared by the full context (S = T) and the incremental one (T = 1, S = the cached window).
    """
    logits = jnp.einsum("BTND,BSND->BNTS", q, k) / np.sqrt(q.shape[-1])
    logits = logits - slopes[None, :, None, None] * dist[:, None].astype(jnp.float32)
    logits = jnp.where(mask[:, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("BNTS,BSND->BTND", probs, v)


class ContextBlock(nnx.Module):
    """Pre-norm causal self-attention (ALiBi) + GELU MLP."""

    def __init__(self, cfg: LearnedConfig, *, rngs: nnx.Rngs) -> None:
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg.mlp_hidden, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_hidden, d, rngs=rngs)
        self.slopes = nnx.Variable(jnp.asarray(alibi_slopes(cfg.num_heads)))  # [N] not trained

    def qkv_heads(self, x: jax.Array) -> list[jax.Array]:
        """q, k, v [B, T, N, D] from x [B, T, d]."""
        b, t, d = x.shape
        n = self.num_heads
        return jnp.split(self.qkv(self.attn_norm(x)).reshape(b, t, 3 * n, d // n), 3, axis=2)

    def finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        """Block output [B, T, d] from its input x [B, T, d] and the attention result [B, T, N, D]."""
        x = x + self.proj(attended.reshape(x.shape))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))

    def __call__(self, x: jax.Array, mask: jax.Array, dist: jax.Array) -> jax.Array:
        q, k, v = self.qkv_heads(x)
        return self.finish(x, alibi_attention(q, k, v, self.slopes[...], mask, dist))


class StepBlock(nnx.Module):
    """Pre-norm residual GELU MLP applied to every (token, layer) step."""

    def __init__(self, cfg: LearnedConfig, *, rngs: nnx.Rngs) -> None:
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, cfg.mlp_hidden, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_hidden, cfg.d_model, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return z + self.down(jax.nn.gelu(self.up(self.norm(z))))


class PriorTable(nnx.Variable):
    """Fitted causal-table arrays (prior.py): not trained, saved in table_prior.npz, not with the params."""


class RoutingPredictorNet(nnx.Module):
    def __init__(self, cfg: LearnedConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        d, keys = cfg.d_model, cfg.num_layers * cfg.num_experts
        small = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(cfg.token_buckets + 1, d, embedding_init=small, rngs=rngs)
        self.route_embed = nnx.Embed(keys, d, embedding_init=small, rngs=rngs)  # previous token's routing
        self.in_norm = nnx.LayerNorm(d, rngs=rngs)
        self.blocks = nnx.List([ContextBlock(cfg, rngs=rngs) for _ in range(cfg.context_layers)])
        self.ctx_norm = nnx.LayerNorm(d, rngs=rngs)
        self.layer_embed = nnx.Embed(cfg.num_layers, d, embedding_init=small, rngs=rngs)
        self.prefix_embed = nnx.Embed(keys, d, embedding_init=small, rngs=rngs)  # token t, layers < l
        self.last_embed = nnx.Embed(keys, d, embedding_init=small, rngs=rngs)  # token t, layer l-1
        if cfg.hidden_size is not None:
            self.hidden_norm = nnx.LayerNorm(cfg.hidden_size, rngs=rngs)
            self.hidden_proj = nnx.Linear(cfg.hidden_size, d, rngs=rngs)
        self.step_blocks = nnx.List([StepBlock(cfg, rngs=rngs) for _ in range(cfg.step_blocks)])
        self.out_norm = nnx.LayerNorm(d, rngs=rngs)
        if not cfg.table_prior:
            self.out = nnx.Linear(d, (cfg.horizon + 1) * cfg.num_experts, rngs=rngs)
            return
        zeros = nnx.initializers.zeros
        # a residual over the table: zero output layer = the table's own ranking at step 0
        self.out = nnx.Linear(d, (cfg.horizon + 1) * cfg.num_experts, kernel_init=zeros, rngs=rngs)
        L, E, D, U = cfg.num_layers, cfg.num_experts, cfg.horizon + 1, cfg.prior_token_rows
        G = max(1, min(cfg.horizon + 1, L - 1))
        self.prior_in = nnx.Linear(D * E, d, kernel_init=small, rngs=rngs)
        self.prior_scale = nnx.Param(jnp.ones((D,), jnp.float32))
        self.prior_log_layer = PriorTable(jnp.zeros((L, E), jnp.float32))
        self.prior_tok = PriorTable(jnp.zeros((U, L, E), jnp.float32))
        self.prior_token_ids = PriorTable(jnp.full((U,), -1, jnp.int32))
        self.prior_cond = PriorTable(jnp.zeros((G + 1, L, E, E), jnp.float32))
        self.prior_cross = PriorTable(jnp.zeros((L, E, E), jnp.float32))
        self.prior_weights = PriorTable(jnp.zeros((3,), jnp.float32))

    # -- the causal-table prior (cfg.table_prior) --------------------------------------
    def install_prior(self, prior: TablePrior) -> None:
        """Set the fitted tables, rounded to float16 as the checkpoint stores them (training sees the same)."""
        if not self.cfg.table_prior:
            raise LearnedPredictorError("this network was built without table_prior; it takes no table prior")
        if prior.top_k != self.cfg.top_k:
            raise LearnedPredictorError(f"table prior fitted for top-k {prior.top_k}, network has {self.cfg.top_k}")
        half = lambda x: jnp.asarray(np.asarray(x, np.float16), jnp.float32)  # noqa: E731
        for name, value in (("log_layer", jnp.asarray(prior.log_layer, jnp.float32)), ("tok", half(prior.tok)),
                            ("token_ids", jnp.asarray(prior.token_ids, jnp.int32)), ("cond", half(prior.cond)),
                            ("cross", half(prior.cross)), ("weights", jnp.asarray(prior.weights, jnp.float32))):  # fmt: skip
            var = getattr(self, f"prior_{name}")
            if tuple(var.shape) != tuple(value.shape):
                raise LearnedPredictorError(f"table prior {name} has shape {tuple(value.shape)}, "
                                            f"the network's config expects {tuple(var.shape)}")  # fmt: skip
            var.set_value(value)

    def table_prior(self) -> TablePrior:
        """The installed tables (host copies), e.g. to save them."""
        g = lambda n: np.asarray(getattr(self, f"prior_{n}")[...])  # noqa: E731
        return TablePrior(log_layer=g("log_layer"), tok=g("tok"), token_ids=g("token_ids").astype(np.int64),
                          cond=g("cond"), cross=g("cross"), weights=g("weights"), top_k=self.cfg.top_k)  # fmt: skip

    def prior_q(self, tok_row: jax.Array, experts: jax.Array, prev_experts: jax.Array,
                has_prev: jax.Array) -> jax.Array:  # fmt: skip
        """Table scores [B, T, L, horizon+1, E] (prior.prior_scores; no gradient flows into the tables)."""
        arrays = {n: jax.lax.stop_gradient(getattr(self, f"prior_{n}")[...])
                  for n in ("log_layer", "tok", "cond", "cross", "weights")}  # fmt: skip
        return prior_scores(arrays, tok_row, experts, prev_experts, has_prev, self.cfg.horizon, self.cfg.top_k)

    def prior_features(self, q: jax.Array) -> jax.Array:
        """[..., d] from table scores q [..., horizon+1, E]."""
        return self.prior_in(q.reshape(*q.shape[:-2], -1))

    def apply_prior(self, logits: jax.Array, q: jax.Array) -> jax.Array:
        """logits [..., horizon+1, E] + a_d * logit(q)."""
        return logits + self.prior_scale[...][:, None] * prior_logit(q)

    def _keys(self, experts: jax.Array) -> jax.Array:
        """[..., L, k] expert ids -> (layer, expert) keys l*E + e."""
        layer = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)[:, None] * self.cfg.num_experts
        return experts.astype(jnp.int32) + layer

    def context_input(self, tok: jax.Array, prev_experts: jax.Array, has_prev: jax.Array) -> jax.Array:
        """x [..., d] entering the context blocks from tok [...], prev_experts [..., L, k], has_prev [...]."""
        route = self.route_embed(self._keys(prev_experts)).sum((-3, -2))  # [..., d]
        return self.in_norm(self.token_embed(tok) + jnp.where(has_prev[..., None], route, 0.0))

    def context(self, tok: jax.Array, prev_experts: jax.Array, has_prev: jax.Array,
                seg: jax.Array, pos: jax.Array) -> jax.Array:  # fmt: skip
        """h [B, T, d] from tok [B, T], prev_experts [B, T, L, k] (token t-1's routing), has_prev [B, T]."""
        x = self.context_input(tok, prev_experts, has_prev)
        mask = attention_mask(seg, pos, self.cfg.window)
        dist = jnp.maximum(pos[:, :, None] - pos[:, None, :], 0)  # [B, T, T]
        for block in self.blocks:
            x = block(x, mask, dist)
        return self.ctx_norm(x)

    def hidden_features(self, hidden: jax.Array) -> jax.Array:
        """[..., d] projection of router inputs [..., H] (needs cfg.hidden_size)."""
        return self.hidden_proj(self.hidden_norm(hidden.astype(jnp.float32)))

    def step_features(self, h: jax.Array, experts: jax.Array, hidden: jax.Array | None = None) -> jax.Array:
        """z [B, T, L, d] from h [B, T, d], token t's routing experts [B, T, L, k] and router inputs [B, T, L, H]."""
        keys = self._keys(experts)  # [B, T, L, k]
        per_layer = self.prefix_embed(keys).sum(-2)  # [B, T, L, d]
        prefix = jnp.cumsum(per_layer, axis=2) - per_layer  # layers < l only
        last = self.last_embed(keys).sum(-2)  # [B, T, L, d]
        last = jnp.pad(last[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))  # layer l sees l-1
        layers = self.layer_embed(jnp.arange(self.cfg.num_layers))  # [L, d]
        z = h[:, :, None, :] + layers + prefix + last
        if self.cfg.hidden_size is not None:
            if hidden is None:
                raise ValueError("this network was trained with router inputs; the traces must store them")
            hz = self.hidden_features(hidden)  # [B, T, L, d]
            z = z + jnp.pad(hz[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))  # layer l sees l-1
        return z

    def step_head(self, z: jax.Array) -> jax.Array:
        """logits [..., horizon+1, E] from z [..., d]."""
        for block in self.step_blocks:
            z = block(z)
        logits = self.out(self.out_norm(z))
        return logits.reshape(*z.shape[:-1], self.cfg.horizon + 1, self.cfg.num_experts)

    def __call__(self, tok, prev_experts, has_prev, seg, pos, experts, hidden=None, tok_row=None) -> jax.Array:
        """All-step logits [B, T, L, horizon+1, E] of a packed batch.

        tok_row [B, T]: each token's row in the table prior's token table (-1: none), required with
        cfg.table_prior (``prior.TablePrior.token_rows`` of the token ids).
        """
        h = self.context(tok, prev_experts, has_prev, seg, pos)
        z = self.step_features(h, experts, hidden)
        if not self.cfg.table_prior:
            return self.step_head(z)
        if tok_row is None:
            raise LearnedPredictorError("this network uses the causal-table prior: pass tok_row (token-table rows)")
        q = self.prior_q(tok_row, experts, prev_experts, has_prev)
        return self.apply_prior(self.step_head(z + self.prior_features(q)), q)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
