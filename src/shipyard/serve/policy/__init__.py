"""Policy: who may call (auth, rate limits) and which version answers (canary and shadow rollouts)."""
