"""The one-jit decode step compiles once per engine configuration, not once more on its second call."""

from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts



def test_second_step_reuses_the_first_steps_executable(tiny_model):
    cfg, g, p, ex, _ = tiny_model("qwen3_moe")
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=4, decode_path="onejit")
    prompt = [[5, 9, 17, 33]]
    # Two new tokens: the step runs once, on the arguments start() hands it (not yet step outputs).
    assert engine.generate(prompt, 2, stop_at_eos=False).stats["decode_path"] == "onejit"
    # Later steps take the step's own outputs; with the same prompt nothing else is new to compile.
    assert engine.generate(prompt, 6, stop_at_eos=False).stats["compiles"] == 0


def test_batches_of_one_bucket_share_one_step_and_dummy_rows_stay_invisible(tiny_model):
    cfg, g, p, ex, _ = tiny_model("qwen3_moe")
    onejit = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=4, decode_path="onejit")
    staged = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=4, decode_path="staged")
    prompts = [[5, 9, 17, 33], [2, 3], [7, 7, 7], [11]]
    onejit.generate(prompts, 4, stop_at_eos=False, return_logits=True)  # compiles for the bucket of 4 rows
    seen = []
    out = onejit.generate(prompts[:3], 4, stop_at_eos=False, observers=[seen.append], return_logits=True)
    assert out.stats["decode_path"] == "onejit" and out.stats["compiles"] == 0  # 3 rows run in bucket 4
    ref = staged.generate(prompts[:3], 4, stop_at_eos=False)
    assert out.tokens == ref.tokens and out.logits.shape[0] == 3
    # The dummy row asked for no expert: as many lookups as the staged engine made for 3 rows.
    lookups = lambda s: s["device"]["hits"] + s["device"]["misses"]  # noqa: E731
    assert lookups(out.stats) == lookups(ref.stats)
    assert seen and all(step.ids.shape[0] == 3 for step in seen)
