"""Rate card, usage ledger, budgets, Stripe and invoices (issue: billing)."""
