"""`cptkit run`: the stages of a config in order, each skipped when its inputs and config are unchanged."""
