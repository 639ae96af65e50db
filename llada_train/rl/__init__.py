"""Post-training with verifiable rewards: ESPO (``llada-rl``): rewards, rollouts, the objective."""
