"""Cursor pagination for lists that can grow: stable under inserts, no COUNT(*)."""

from rest_framework.pagination import CursorPagination


class CreatedCursorPagination(CursorPagination):
    ordering = ("-created_at", "-pk")
    page_size_query_param = "page_size"
    max_page_size = 200
