"""Parse expert budgets given as a fraction (0.25), a percentage (25%), a count (16) or `all`."""

from __future__ import annotations

from emoe_jax.errors import EmoeError


class BudgetError(EmoeError):
    """An impossible cache size; the message says what is allowed."""


def parse_expert_count(spec: str | float | int | None, total: int, name: str, minimum: int = 1,
                       per: str = "per layer") -> int:
    """Experts for a flag like --device-experts (`per`: what `total` counts, for messages).

    The rule (stated in generate --help): `all` or `100%` is every expert; `N%` a
    percentage; a value with a decimal point (or below 1) a fraction of `total`,
    rounded up (0.1 of 64 is 7); an integer a count, so `1` is ONE expert, `1.0` all.
    None means all.
    """
    if spec is None:
        return total
    text = str(spec).strip().lower()
    if text == "all":
        return total
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        raise BudgetError(f"{name}={spec!r} is none of: a fraction (0.25), a percentage (25%), a count (16), "
                          "or all") from None
    if percent:
        if not 0 < value <= 100:
            raise BudgetError(f"{name}={spec} as a percentage must be in (0%, 100%]")
        value, text = value / 100, "fraction"
    if "." in text or "e" in text or text == "fraction" or not value.is_integer():
        if not 0 < value <= 1:
            raise BudgetError(f"{name}={spec} as a fraction must be in (0, 1]")
        count = -(-int(round(value * total * 1e6)) // 1_000_000)  # ceil without float noise
    else:
        count = int(value)
    if count < minimum or count > total:
        raise BudgetError(
            f"{name}={spec} gives {count} experts {per}; it must be between {minimum} and {total} "
            f"(the model has {total} experts {per}). Use a fraction in (0, 1], a percentage, a count, or all."
        )
    return count


def parse_per_layer_counts(spec, total: int, num_layers: int, name: str) -> list[int]:
    """Slots per layer: one value for every layer (0.25, 16) or one per layer ("4,8,8,16" or a list)."""
    if spec is None or isinstance(spec, (int, float)):
        return [parse_expert_count(spec, total, name)] * num_layers
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(items) == 1:
        return [parse_expert_count(items[0], total, name)] * num_layers
    if len(items) != num_layers:
        raise BudgetError(f"{name} lists {len(items)} values but the model has {num_layers} MoE layers; "
                          "give one value for all layers or exactly one per MoE layer")
    return [parse_expert_count(x, total, f"{name}[{i}]") for i, x in enumerate(items)]
