"""GRPO after SFT: prompts, rewards, TRL's GRPOTrainer, held-out scoring."""
