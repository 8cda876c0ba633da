"""Model reprogramming: reuse a frozen (hardened) source model for a new task.

AR (white-box), BAR (black-box, zeroth-order) and R2DL (dictionary learning for sequences) share
one shape: an input transformation (the program), a frozen source model and an output label
mapping. See ../shared/reference/reprogramming.md for the specification.
"""
