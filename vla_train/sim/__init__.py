"""Simulators: Meta-World environments, their scripted experts and the demonstrations written from them."""
