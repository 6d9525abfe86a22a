"""Parse expert budgets given as a fraction of all experts (0.25) or a count (16)."""

from __future__ import annotations


class BudgetError(ValueError):
    """An impossible cache size; the message says what is allowed."""


def parse_expert_count(spec: str | float | int | None, total: int, name: str, minimum: int = 1) -> int:
    """Experts per layer for a flag like --device-experts.

    A value with a decimal point or below 1 is a fraction of `total` (rounded up,
    so 0.1 of 64 is 7); an integer is a count. None means all.
    """
    if spec is None:
        return total
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"{name}={spec!r} is neither a fraction (0.25) nor a count (16)") from None
    if "." in text or "e" in text.lower() or not value.is_integer():
        if not 0 < value <= 1:
            raise BudgetError(f"{name}={spec} as a fraction must be in (0, 1]")
        count = -(-int(round(value * total * 1e6)) // 1_000_000)  # ceil without float noise
    else:
        count = int(value)
    if count < minimum or count > total:
        raise BudgetError(
            f"{name}={spec} gives {count} experts per layer; it must be between {minimum} and {total} "
            f"(the model has {total} experts per layer). Use a fraction in (0, 1] or a count."
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
