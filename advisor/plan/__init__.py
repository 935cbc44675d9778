"""Under a second, no torch (tests/test_layers.py pins it): from a scenario to a ranked, explained pick.

`constraints` (what can run where, once), `estimate` (peak memory and latency per configuration),
`space` (the candidate configurations), `rules` (diffusers' guidance as named rules) and `recommend`
(the engine that scores candidates and explains the pick).
"""
