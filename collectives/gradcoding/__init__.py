"""Gradient coding: the codes, the sequential schemes and their rounds, the bursty straggler model."""
