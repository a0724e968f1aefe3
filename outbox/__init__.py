"""Side effects owed after a commit (e-mails, Celery tasks, calls to other services), written as
rows in the same transaction as the change that owes them and delivered until they succeed."""
