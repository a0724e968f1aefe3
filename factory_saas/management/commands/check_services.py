"""Fail fast, naming what is unreachable, before a test run spends minutes finding out."""

import sys

import psycopg
import psycopg.sql
import redis
from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Check that PostgreSQL and Redis answer; create the database if it is missing."

    def handle(self, *args, **options):
        problems = []
        db = settings.DATABASES["default"]
        if "postgresql" in db["ENGINE"]:
            where = f"PostgreSQL at {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"
            try:
                self._ensure_database(db)
            except psycopg.Error as exc:
                problems.append(f"{where} is not reachable (DATABASE_URL): {exc}".strip())
        if settings.REDIS_URL:
            try:
                redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3).ping()
            except redis.RedisError as exc:
                problems.append(
                    f"Redis at {settings.REDIS_URL} is not reachable (REDIS_URL): {exc}"
                )
        for problem in problems:
            self.stderr.write(self.style.ERROR(problem))
        if problems:
            sys.exit(1)
        self.stdout.write("PostgreSQL and Redis answer.")

    @staticmethod
    def _ensure_database(db) -> None:
        """Connect to the server's maintenance database and create ours if it is missing."""
        with psycopg.connect(
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            connect_timeout=3,
            autocommit=True,
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]
            ).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(db["NAME"]))
                )
