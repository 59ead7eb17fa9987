"""What runs in the ServerApp: the run (:mod:`.run`), the round loop (:mod:`.rounds`), reply checks
(:mod:`.reply_checks`), outputs (:mod:`.outputs`) and resume state (:mod:`.resume`).
"""
