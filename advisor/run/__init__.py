"""Minutes, torch: load and apply configurations, measure them, and search with optuna.

`apply` (config -> ordered post-load steps), `checks` (refuse what this machine or pipeline can't
run), `emit` (the same steps as a script), `measure` (one trial in its own process), `tune` (the
optuna study; `confirm` measures its finalists again, `stopping` handles SIGTERM and Ctrl-C), `report`
(plot and summary of a study).
"""
