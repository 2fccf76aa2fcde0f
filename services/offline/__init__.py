"""Offline evaluation building blocks: off-policy estimators, logged slates, policy evaluation and ranking
metrics. Pure (no storage, no service imports); the ranking evaluation of the served pipeline is
services/recommend/training/evaluation.py."""
