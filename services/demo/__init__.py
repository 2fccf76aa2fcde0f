"""The demo shop (catalog) and a visitor simulator with hidden tastes, for demos, tests and benchmarks."""

from services.demo.shop import CATEGORIES, DemoShop, generate_shop
from services.demo.simulator import VISITOR_TYPES, ShownItem, Simulator, SimVisitor, read_jsonl, write_jsonl

__all__ = [
    "CATEGORIES",
    "VISITOR_TYPES",
    "DemoShop",
    "ShownItem",
    "SimVisitor",
    "Simulator",
    "generate_shop",
    "read_jsonl",
    "write_jsonl",
]
