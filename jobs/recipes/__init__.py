"""Recipes: platform code that trains models from tenants' data and parameters, one per module."""
