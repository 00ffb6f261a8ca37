"""Command-line tools that plan a run without running it (`python -m dpo_jax.tools.memory`)."""
