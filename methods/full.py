"""Full cache: keeps every token (the uncompressed baseline every method is compared with)."""
from dataclasses import dataclass

from kvbench.method import Method, register_method


@register_method("full")
@dataclass
class Full(Method):
    paper = "baseline (no compression)"
    family = "baseline"
    uses_budget = False
