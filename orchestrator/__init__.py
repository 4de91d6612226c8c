"""The control side of the drain orchestrator: model, planner, cluster adapter, Redis records, API, CLI."""
