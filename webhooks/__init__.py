"""Tenant webhooks: endpoints per organization, events owed in the transaction that makes them,
delivered signed (Standard Webhooks) with backoff, logged, and refused for internal addresses."""
