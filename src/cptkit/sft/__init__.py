"""Supervised fine-tuning data: instruction records -> rendered, label-masked, packed rows."""
