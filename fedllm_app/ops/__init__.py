"""Operator and developer tooling that the apps never import: the Flower-run helper (:mod:`.flower_run`),
a local deployment harness (:mod:`.deploy`), the warm SuperExec (:mod:`.warm_superexec`) and sweeps
(:mod:`.sweep`). Left out of the Flower app bundle.
"""
