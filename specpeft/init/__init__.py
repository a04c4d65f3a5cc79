"""Initializers: truncated/randomized SVD, Kronecker (KPSVD) and Tucker decompositions."""
