"""Conformance: checks that a backend computes what the reference computes (ops, collectives, model)."""
