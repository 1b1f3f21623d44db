"""cptkit: continued pretraining of large language models, from raw domain text to a model that
knows the domain without forgetting what it knew, with the measurements that prove both."""

__version__ = "0.1.0"
