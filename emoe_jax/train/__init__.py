"""emoe_jax.train: training the embedded default MoE model, exporting it, analysing its routing.

    python -m emoe_jax.train lm --corpus out/corpus --tokenizer out/tokenizer --out out/train_embedded
    python -m emoe_jax.train export out/train_embedded checkpoints/embedded --samples
    python -m emoe_jax.train analyze checkpoints/embedded --corpus out/corpus --split validation --json

Modules: presets (the `embedded` MoEConfig), forward (training forward with router statistics; experts mixed by
model.moe.mix_blocked_slots, exact and fastest on CPU), losses,
step (init, optimizer, jitted train/eval steps), checkpointing (Orbax, resumable),
data (cached token streams), evaluate (per-task perplexity), loop (`train_lm`),
export (`export_run`), analyze (`analyze_checkpoint`, mutual information), samples.
"""

from emoe_jax.train.analyze import analyze_checkpoint, experts_for_share, mutual_information, routing_tables
from emoe_jax.train.checkpointing import TrainCheckpointError
from emoe_jax.train.export import export_run, load_run
from emoe_jax.train.forward import RouterStats, train_forward
from emoe_jax.train.losses import load_balance_loss, next_token_loss, router_z_loss
from emoe_jax.train.loop import RunConfig, train_lm
from emoe_jax.train.presets import TRAIN_PRESETS, get_train_preset
from emoe_jax.train.step import OptimConfig, init_model, make_optimizer, train_step

__all__ = [
    "OptimConfig", "RouterStats", "RunConfig", "TRAIN_PRESETS", "TrainCheckpointError", "analyze_checkpoint",
    "experts_for_share", "export_run", "get_train_preset", "init_model", "load_balance_loss", "load_run",
    "make_optimizer", "mutual_information", "next_token_loss", "router_z_loss", "routing_tables",
    "train_forward", "train_lm", "train_step",
]
