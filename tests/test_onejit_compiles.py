"""The one-jit decode step compiles once per engine configuration, not once more on its second call."""

from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts

from engine_fixtures import model


def test_second_step_reuses_the_first_steps_executable():
    cfg, g, p, ex, _ = model("qwen3_moe")
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=4, decode_path="onejit")
    prompt = [[5, 9, 17, 33]]
    # Two new tokens: the step runs once, on the arguments start() hands it (not yet step outputs).
    assert engine.generate(prompt, 2, stop_at_eos=False).stats["decode_path"] == "onejit"
    # Later steps take the step's own outputs; with the same prompt nothing else is new to compile.
    assert engine.generate(prompt, 6, stop_at_eos=False).stats["compiles"] == 0
