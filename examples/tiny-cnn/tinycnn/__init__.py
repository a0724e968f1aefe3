"""A tiny convolutional network that tells horizontal from vertical bars: a tenant's own code."""
