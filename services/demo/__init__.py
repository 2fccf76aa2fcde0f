"""The demo shop (catalog) and a visitor simulator with hidden tastes, for demos, tests and benchmarks."""

from services.demo.catalogue import CATEGORIES
from services.demo.files import read_jsonl, write_jsonl
from services.demo.reactions import ShownItem
from services.demo.shop import DemoShop, generate_shop
from services.demo.simulator import Simulator
from services.demo.visitor_types import VISITOR_TYPES, SimVisitor

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
