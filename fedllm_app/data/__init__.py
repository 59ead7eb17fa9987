"""The data pipeline, one module per step, in the order data flows.

sources (:mod:`.synthetic`, :mod:`.catalogue`: a Hub dataset, a local file, a node's own file)
-> rows and preference pairs (:mod:`.rows`, :mod:`.pairs`) -> the server's hold-out (:mod:`.holdout`)
-> client partitions (:mod:`.partitions`) -> the per-round sample (:mod:`.sampling`)
-> TRL's prompt/completion or preference form (:mod:`.templates`, :mod:`.trl_form`).

:mod:`.pipeline` composes the steps for a run config. Nothing here imports the client, the
server or evaluation; an import-linter contract (pyproject.toml) keeps each step from importing a later one.
"""
