"""`cptkit demo`: a real base model, real domain text and the whole pipeline, offline, in minutes."""
