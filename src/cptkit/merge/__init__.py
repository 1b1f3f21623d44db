"""Merging a LoRA adapter into its base model, streamed shard by shard (see `cptkit merge`)."""
