"""Secure aggregation (SecAgg+): the pure protocol, with no Flower plumbing (:mod:`fedllm_app.secure.secagg`)."""
