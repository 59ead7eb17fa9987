"""What runs on a SuperNode: one client round (:mod:`.round`), the TRL trainer (:mod:`.trainer`),
the FedProx/SCAFFOLD gradient terms (:mod:`.gradient_terms`) and test-only fault injection (:mod:`.faults`).
"""
