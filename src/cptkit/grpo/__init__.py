"""GRPO after SFT: prompt sets rendered as SFT renders them, rewards built from the config, TRL's trainer."""
